fn main() {
    std::process::exit(cni_shim::run())
}
