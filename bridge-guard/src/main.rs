fn main() -> std::process::ExitCode {
    bridge_guard::cli::main()
}
