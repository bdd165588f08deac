//! With the `cuda` feature, compiles engine/kernels/*.cu to PTX with nvcc (from `CUDA_HOME`
//! or PATH; deploy/cuda/build.sh provides a pinned one). The PTX is embedded in the binary and
//! loaded by the driver, which compiles it for the GPU it runs on.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/sparsegrad.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("sparsegrad.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-fmad=false",
            &format!("-arch=compute_{cap}"),
        ])
        .arg("-o")
        .arg(&out)
        .arg("kernels/sparsegrad.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e} (set CUDA_HOME)", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/sparsegrad.cu");
}
