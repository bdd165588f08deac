// Tensor code allocates and frees large buffers every step; mimalloc with purging disabled keeps
// them mapped instead of returning them to the kernel, which saves page faults and zeroing
// (about a tenth of a CPU training step with glibc's allocator). `SPARSEGRAD_PURGE_DELAY_MS`
// (read here, before the config exists: the allocator is set up before anything allocates)
// returns memory unused for that long instead (-1, the default: never).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let delay = std::env::var("SPARSEGRAD_PURGE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<std::os::raw::c_long>().ok())
        .unwrap_or(-1);
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        // `mi_option_purge_delay` (15 in mimalloc v2, which the crate builds) is not exported.
        libmimalloc_sys::mi_option_set(15, delay);
    }
    sparsegrad_service::tools::cli::main()
}
