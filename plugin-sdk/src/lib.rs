//! `rewind-plugin-sdk`: the crate plugin authors will use to write Rewind plugins
//! (transforms, destinations, ingress adapters) as WASM components. It is empty until the
//! plugin issue lands its WIT package (`plugin-sdk/wit/`) and the SDK around it; the crate
//! exists now so the workspace has its final shape.
