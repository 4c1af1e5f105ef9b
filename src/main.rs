fn main() -> std::process::ExitCode {
    pandaguard::cli::main()
}
