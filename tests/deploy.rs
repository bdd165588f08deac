//! The deploy files against the binary they configure: every setting they pass (environment
//! names and command-line flags) exists in `Config` or on the subcommand they run, every
//! required setting is provided, and every stop timeout leaves room for the worker's drain.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use sparsegrad_service::server::WORKER_DRAIN;
use sparsegrad_service::tools::cli::Cli;

fn read(p: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(p);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Lines that are not comments.
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Environment names the service reads (`SPARSEGRAD_*`, `DATABASE_URL`) set or read in `text`.
fn env_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("SPARSEGRAD_") || *w == "DATABASE_URL")
        .map(String::from)
        .collect()
}

/// `(subcommand, flags)` of every one-line `args: [...]` / `command: [...]` running the binary.
fn invocations(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for l in code(text).lines() {
        let l = l.trim();
        let Some(list) = l
            .strip_prefix("args:")
            .or_else(|| l.strip_prefix("command:"))
            .map(str::trim)
            .and_then(|r| r.strip_prefix('['))
            .and_then(|r| r.strip_suffix(']'))
        else {
            continue;
        };
        let items: Vec<String> = list
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .collect();
        if let Some((sub, rest)) = items.split_first() {
            let flags = rest
                .iter()
                .filter(|a| a.starts_with("--"))
                .cloned()
                .collect();
            out.push((sub.clone(), flags));
        }
    }
    out
}

fn service_envs() -> (BTreeSet<String>, BTreeSet<String>) {
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve");
    let mut all = BTreeSet::new();
    let mut required = BTreeSet::new();
    for a in serve.get_arguments() {
        if let Some(e) = a.get_env() {
            let e = e.to_string_lossy().to_string();
            if a.is_required_set() {
                required.insert(e.clone());
            }
            all.insert(e);
        }
    }
    (all, required)
}

const FILES: &[&str] = &[
    "deploy/env.example",
    "deploy/sparsegrad.service",
    "deploy/Dockerfile",
    "deploy/cuda/Dockerfile",
    "deploy/compose.yaml",
    "deploy/k8s/config.yaml",
    "deploy/k8s/secret.example.yaml",
    "deploy/k8s/migrate-job.yaml",
    "deploy/k8s/api.yaml",
    "deploy/k8s/worker.yaml",
    "deploy/k8s/fsck-cronjob.yaml",
];

#[test]
fn every_setting_the_deploy_files_pass_exists() {
    let (known, _) = service_envs();
    assert!(
        known.contains("DATABASE_URL") && known.len() > 20,
        "{known:?}"
    );
    for f in FILES {
        for name in env_names(&read(f)) {
            assert!(
                known.contains(&name),
                "{f} sets {name}, which the service does not read"
            );
        }
    }
}

#[test]
fn every_flag_the_deploy_files_pass_exists_on_its_subcommand() {
    let cli = Cli::command();
    let mut seen = BTreeSet::new();
    for f in FILES.iter().filter(|f| f.ends_with(".yaml")) {
        for (sub, flags) in invocations(&read(f)) {
            if matches!(sub.as_str(), "sh" | "CMD") {
                continue;
            }
            let cmd = cli
                .find_subcommand(&sub)
                .unwrap_or_else(|| panic!("{f} runs `sparsegrad {sub}`, which does not exist"));
            for flag in flags {
                let name = flag.trim_start_matches("--");
                assert!(
                    cmd.get_arguments().any(|a| a.get_long() == Some(name)),
                    "{f} passes {flag} to `sparsegrad {sub}`, which has no such flag"
                );
            }
            seen.insert(sub);
        }
    }
    for sub in ["serve", "worker", "migrate", "fsck"] {
        assert!(seen.contains(sub), "no deploy file runs `sparsegrad {sub}`");
    }
}

#[test]
fn every_required_setting_is_provided() {
    let (_, required) = service_envs();
    assert_eq!(
        required,
        BTreeSet::from(["DATABASE_URL".to_string()]),
        "update the deploy files for a new required setting"
    );
    let set_in = |files: &[&str]| -> BTreeSet<String> {
        files
            .iter()
            .flat_map(|f| env_names(&code(&read(f))))
            .collect()
    };
    // Compose: one environment block shared by every service that runs the binary.
    let compose = set_in(&["deploy/compose.yaml"]);
    // Kubernetes: the ConfigMap and the Secret, which every workload takes whole.
    let k8s = set_in(&["deploy/k8s/config.yaml", "deploy/k8s/secret.example.yaml"]);
    let env_file = set_in(&["deploy/env.example"]);
    for (what, set) in [
        ("compose", &compose),
        ("k8s", &k8s),
        ("env.example", &env_file),
    ] {
        for r in &required {
            assert!(set.contains(r), "{what} does not set {r}");
        }
        // Object storage on S3 needs its endpoint and credentials with it.
        if set.contains("SPARSEGRAD_STORAGE_URL") && what != "env.example" {
            for s3 in [
                "SPARSEGRAD_S3_ENDPOINT",
                "SPARSEGRAD_S3_ACCESS_KEY_ID",
                "SPARSEGRAD_S3_SECRET_ACCESS_KEY",
            ] {
                assert!(set.contains(s3), "{what} uses S3 without {s3}");
            }
        }
    }
    for f in [
        "deploy/k8s/migrate-job.yaml",
        "deploy/k8s/api.yaml",
        "deploy/k8s/worker.yaml",
        "deploy/k8s/fsck-cronjob.yaml",
    ] {
        let t = read(f);
        for r in ["name: sparsegrad-config", "name: sparsegrad-secrets"] {
            assert!(t.contains(r), "{f} does not take `{r}` (envFrom)");
        }
    }
    let compose_text = read("deploy/compose.yaml");
    for service in ["migrate:", "api:", "worker:", "fsck:"] {
        let block = compose_text
            .split(&format!("\n  {service}\n"))
            .nth(1)
            .unwrap();
        let block = block.split("\n\n").next().unwrap();
        assert!(
            block.contains("<<: *sparsegrad"),
            "compose service {service} does not take the shared environment"
        );
    }
}

/// Seconds in the first `key: <n>` (or `key: <n>s`) line.
fn secs_after(text: &str, key: &str) -> u64 {
    let l = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key}"));
    l.trim_start_matches(':')
        .trim()
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|e| panic!("{key}{l}: {e}"))
}

#[test]
fn stop_timeouts_leave_room_for_the_drain() {
    let drain = WORKER_DRAIN.as_secs();
    let k8s = secs_after(
        &read("deploy/k8s/worker.yaml"),
        "terminationGracePeriodSeconds",
    );
    let compose = secs_after(&read("deploy/compose.yaml"), "stop_grace_period");
    let systemd = secs_after(&read("deploy/sparsegrad.service"), "TimeoutStopSec=");
    for (what, secs) in [
        ("k8s worker", k8s),
        ("compose", compose),
        ("systemd", systemd),
    ] {
        assert!(
            secs > drain,
            "{what} kills after {secs} s, before the {drain} s drain ends"
        );
    }
}
