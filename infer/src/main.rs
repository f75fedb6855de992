fn main() -> std::process::ExitCode {
    retina_infer::cli::main()
}
