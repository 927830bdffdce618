//! Types and service stubs generated from `proto/rewind/v1/*.proto` (package `rewind.v1`).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("rewind.v1");
}
