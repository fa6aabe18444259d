//! Compiles `proto/keel.proto` with prost, using the `protoc` named by `PROTOC`
//! (Debian's `protobuf-compiler`, set in `.cargo/config.toml`), never a downloaded one.

fn main() -> std::io::Result<()> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = proto_dir.join("keel.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    if std::env::var_os("PROTOC").is_none_or(|p| !std::path::Path::new(&p).exists()) {
        panic!(
            "protoc not found: install Debian's protobuf-compiler (`apt-get install \
             protobuf-compiler`, done by scripts/test.sh) or set PROTOC to its path"
        );
    }
    prost_build::Config::new().compile_protos(&[file], &[proto_dir])
}
