//! GGUF files are untrusted input: every malformed header or out-of-range model size is an
//! error that names what is wrong — never a panic, a division by zero or an allocation the
//! file asks for. Files are built byte by byte here (a minimal valid LLaMA, then one defect
//! at a time).

use sparsegrad_engine::gguf::{import_gguf, ImportLimits};
use sparsegrad_engine::testing::gguf::{base, build, with, V};

fn import(bytes: &[u8], limits: &ImportLimits) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    import_gguf(&p, &dir.path().join("out"), candle_core::DType::F32, limits)
        .map(|_| ())
        .map_err(|e| {
            assert!(e.is_user_error(), "{e} is not the submitter's to fix");
            e.to_string()
        })
}

#[test]
fn a_minimal_valid_llama_imports() {
    let (kvs, tensors) = base();
    import(&build(&kvs, &tensors), &ImportLimits::NONE).unwrap();
}

#[test]
fn every_bad_size_is_an_error_naming_its_key() {
    for (key, v, want) in [
        ("llama.attention.head_count", V::U32(0), "head_count"),
        ("llama.attention.head_count_kv", V::U32(0), "head_count_kv"),
        ("llama.attention.head_count_kv", V::U32(3), "head_count_kv"),
        ("llama.embedding_length", V::U32(0), "embedding_length"),
        ("llama.block_count", V::U64(u64::MAX), "block_count"),
        ("llama.rope.dimension_count", V::U32(0), "dimension_count"),
        ("general.alignment", V::U32(0), "alignment"),
        ("general.alignment", V::U32(48), "alignment"),
        (
            "tokenizer.ggml.tokens",
            V::ClaimedStrs(1 << 40),
            "exceeds the file",
        ),
        (
            "tokenizer.chat_template",
            V::Str(
                "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            ),
            "fuel",
        ),
    ] {
        let e = import(&with(key, v), &ImportLimits::NONE).unwrap_err();
        assert!(e.contains(want), "{key}: {e}");
    }
}

#[test]
fn malformed_tensors_and_files_are_errors() {
    let (kvs, mut tensors) = base();
    // Dimensions whose product overflows u64.
    tensors[0].1 = vec![u64::MAX / 2, 3];
    let e = import(&build(&kvs, &tensors), &ImportLimits::NONE).unwrap_err();
    assert!(e.contains("overflow"), "{e}");
    // Five dimensions; a zero dimension.
    let (kvs, mut tensors) = base();
    tensors[1].1 = vec![1, 1, 1, 1, 8];
    assert!(import(&build(&kvs, &tensors), &ImportLimits::NONE).is_err());
    let (kvs, mut tensors) = base();
    tensors[1].1 = vec![0];
    assert!(import(&build(&kvs, &tensors), &ImportLimits::NONE).is_err());
    // Cut short: inside the header, and inside the tensor data.
    let (kvs, tensors) = base();
    let whole = build(&kvs, &tensors);
    for cut in [3, 40, whole.len() / 2, whole.len() - 1] {
        let e = import(&whole[..cut], &ImportLimits::NONE).unwrap_err();
        assert!(e.contains("GGUF"), "cut at {cut}: {e}");
    }
    // Not a GGUF file at all (a dataset).
    let e = import(b"text,label\nhello,1\n", &ImportLimits::NONE).unwrap_err();
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn the_parameter_cap_is_enforced_from_the_header() {
    let (kvs, tensors) = base();
    let e = import(&build(&kvs, &tensors), &ImportLimits { max_params: 100 }).unwrap_err();
    assert!(e.contains("limited to 100"), "{e}");
}
