fn main() -> std::process::ExitCode {
    sparsegrad_service::cli::main()
}
