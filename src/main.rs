// Tensor code allocates and frees large buffers every step; mimalloc with purging disabled keeps
// them mapped instead of returning them to the kernel, which saves page faults and zeroing
// (about a tenth of a CPU training step with glibc's allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        // `mi_option_purge_delay` (15 in mimalloc v2, which the crate builds) is not exported.
        libmimalloc_sys::mi_option_set(15, -1);
    }
    sparsegrad_service::tools::cli::main()
}
