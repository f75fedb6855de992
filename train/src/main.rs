fn main() -> std::process::ExitCode {
    retina_train::cli::main()
}
