//! The GPU check's harness, run with the CPU as the device under test: every comparison and
//! the benchmark loop execute here, so the script that will run on a GPU cannot rot unseen.
//! (CPU against CPU agrees exactly; what this catches is a harness or kernel-reference break —
//! the kernel checks compare the radix top-k, CSR scatter and in-place GEMM with their plain
//! definitions on either device.)

use std::process::Command;

#[test]
fn gpu_check_harness_runs_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_sparsegrad"))
        .args(["gpu-check", "--device", "cpu", "--out"])
        .arg(out.path())
        .args([
            "--kernel-shape",
            "300x200",
            "--shapes",
            "bert-base",
            "--layers",
            "1",
        ])
        .args(["--dtypes", "f32", "--steps", "1", "--warmup", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("ours.json")).unwrap()).unwrap();
    let checks = doc["correctness"].as_array().unwrap();
    // 8 kernel checks + a tiny model of every registered architecture × 11 checks.
    let archs = sparsegrad_engine::models::Arch::ALL.len();
    assert_eq!(checks.len(), 8 + archs * 11, "{checks:#?}");
    assert!(checks.iter().all(|c| c["pass"] == true), "{checks:#?}");
    let bench = doc["bench"].as_array().unwrap();
    let methods: Vec<&str> = bench
        .iter()
        .map(|b| b["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["full", "lora", "sparsegrad"]);
    for b in bench {
        assert!(b.get("error").is_none(), "{b}");
        assert!(b["step_ms_median"].as_f64().unwrap() > 0.0, "{b}");
        assert!(b["final_loss"].as_f64().unwrap().is_finite(), "{b}");
    }
    // SparseGrad holds Adam state for its 1% support, full fine-tuning for every weight.
    assert!(bench[2]["optimizer_state"].as_u64() < bench[0]["optimizer_state"].as_u64());
}
