//! `rewind-plugin-sdk`: write Rewind plugins — transforms, destinations, ingress adapters — as
//! WASM components (`wasm32-wasip2`). A plugin implements one trait and calls one macro:
//!
//! ```ignore
//! use rewind_plugin_sdk::{Config, Event, Emit, Transform};
//!
//! struct Upper;
//! impl Transform for Upper {
//!     fn new(_config: Config) -> Result<Self, String> { Ok(Upper) }
//!     fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {
//!         out.payload(&event.payload.to_ascii_uppercase());
//!         Ok(())
//!     }
//! }
//! rewind_plugin_sdk::export_transform!(Upper);
//! ```
//!
//! Enable the feature of the plugin's kind (`transform`, `destination` or `ingress`) and
//! build with `cargo build --release --target wasm32-wasip2` (or `rewind plugin build`).
//! The WIT package is `plugin-sdk/wit/plugin.wit`; `docs/plugins.md` is the tutorial.
//! Without a kind feature the crate is only [`codec`] (the gateway's host uses that).

extern crate self as rewind_plugin_sdk;

pub mod codec;
mod config;
pub mod filter;
pub mod json;

pub use codec::{DecodeError, Event};
pub use config::Config;

#[cfg(any(feature = "transform", feature = "destination", feature = "ingress"))]
mod guest;
#[cfg(any(feature = "transform", feature = "destination", feature = "ingress"))]
pub use guest::*;
#[cfg(feature = "transform")]
pub mod testing;

/// Generated bindings, one module per world; used by the export macros.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    #[cfg(feature = "transform")]
    pub mod transform {
        wit_bindgen::generate!({
            path: "wit",
            world: "transform",
            pub_export_macro: true,
            export_macro_name: "__rewind_export_transform",
            default_bindings_module: "rewind_plugin_sdk::bindings::transform",
            runtime_path: "rewind_plugin_sdk::__rt::wit_bindgen::rt",
        });
    }
    #[cfg(feature = "destination")]
    pub mod destination {
        wit_bindgen::generate!({
            path: "wit",
            world: "destination",
            pub_export_macro: true,
            export_macro_name: "__rewind_export_destination",
            default_bindings_module: "rewind_plugin_sdk::bindings::destination",
            runtime_path: "rewind_plugin_sdk::__rt::wit_bindgen::rt",
        });
    }
    #[cfg(feature = "ingress")]
    pub mod ingress {
        wit_bindgen::generate!({
            path: "wit",
            world: "ingress",
            pub_export_macro: true,
            export_macro_name: "__rewind_export_ingress",
            default_bindings_module: "rewind_plugin_sdk::bindings::ingress",
            runtime_path: "rewind_plugin_sdk::__rt::wit_bindgen::rt",
        });
    }
}

#[doc(hidden)]
pub mod __rt {
    #[cfg(any(feature = "transform", feature = "destination", feature = "ingress"))]
    pub use wit_bindgen;
}
