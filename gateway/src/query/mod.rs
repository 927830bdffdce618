//! The filter language (`docs/query.md`): its syntax tree, parser and meaning live in
//! `rewind_plugin_sdk::filter` so the gateway and the `filter` plugin share one
//! implementation; free-text words ([`text`]) use the search index's tokenizer.

pub use rewind_plugin_sdk::filter::*;

pub mod text;
