//! Compiles `proto/rewind/v1/*.proto` with a vendored `protoc`, so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, setting the variable is sound here.
    unsafe_set_protoc(&protoc);
    let root = "../proto";
    let files = ["admin", "bus", "common", "ingest", "replay", "search"]
        .map(|f| format!("{root}/rewind/v1/{f}.proto"));
    tonic_prost_build::configure()
        .bytes(".rewind.v1")
        .compile_protos(&files, &[root.to_string()])?;
    println!("cargo:rerun-if-changed={root}");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // Edition 2024 makes set_var unsafe; a build script has no other threads.
    unsafe { std::env::set_var("PROTOC", path) };
}
