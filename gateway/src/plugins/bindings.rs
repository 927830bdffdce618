//! Host bindings generated from `plugin-sdk/wit/plugin.wit`, one module per world, and the
//! host side of the imports every world shares (logging).

pub mod transform {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "transform",
        imports: { default: async },
        exports: { default: async },
    });
}

pub mod destination {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "destination",
        imports: { default: async },
        exports: { default: async },
    });
}

pub mod ingress {
    wasmtime::component::bindgen!({
        path: "../plugin-sdk/wit",
        world: "ingress",
        imports: { default: async },
        exports: { default: async },
    });
}
