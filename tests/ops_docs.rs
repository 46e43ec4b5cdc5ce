//! Documentation kept honest by tests: docs/cli.md matches the binary's --help, and the
//! cloud-hypervisor launch script passes its static syntax check.

use std::path::Path;
use std::process::Command;

const REGENERATE: &str =
    "docs/cli.md is out of date: regenerate it with `docs/gen-cli.sh` and commit it";

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-clone"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run vhost-clone --help");
    assert!(out.status.success(), "vhost-clone {args:?} --help failed");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Subcommand names listed under `Commands:` (without clap's `help`).
fn subcommands(help_text: &str) -> Vec<String> {
    let mut in_commands = false;
    let mut out = Vec::new();
    for line in help_text.lines() {
        if line == "Commands:" {
            in_commands = true;
            continue;
        }
        if in_commands {
            if line.is_empty() {
                break;
            }
            if let Some(rest) = line.strip_prefix("  ") {
                if let Some(name) = rest.split_whitespace().next() {
                    if !rest.starts_with(' ') && name != "help" {
                        out.push(name.to_string());
                    }
                }
            }
        }
    }
    out
}

/// Every command path: [], ["serve"], ..., ["metadata", "format"], ...
fn command_paths() -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        for sub in subcommands(&help(&args)) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        all.push(path);
    }
    all
}

#[test]
fn cli_md_matches_help() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    let doc = std::fs::read_to_string(&doc_path)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", doc_path.display()));
    let paths = command_paths();
    assert!(paths.len() > 5, "found only {paths:?}");
    for path in &paths {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let title = if path.is_empty() {
            "## vhost-clone\n".to_string()
        } else {
            format!("## vhost-clone {}\n", path.join(" "))
        };
        assert!(
            doc.contains(&title),
            "no section `{}`: {REGENERATE}",
            title.trim()
        );
        let block = format!("```text\n{}```\n", help(&args));
        assert!(
            doc.contains(&block),
            "`{}--help` differs from docs/cli.md: {REGENERATE}",
            title.trim_start_matches("## ").replace('\n', " ")
        );
    }
    // No stale sections for commands that are gone.
    let sections = doc
        .lines()
        .filter(|l| l.starts_with("## vhost-clone"))
        .count();
    assert_eq!(
        sections,
        paths.len(),
        "docs/cli.md has sections for commands that no longer exist: {REGENERATE}"
    );
}

#[test]
fn cloud_hypervisor_config_syntax() {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("cloud-hypervisor-configs/check-syntax.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run check-syntax.sh");
    assert!(
        out.status.success(),
        "check-syntax.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn capabilities_doc_matches_code() {
    // docs/user-guide.md quotes the --print-capabilities output; keep it in step with the code.
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/user-guide.md"))
            .expect("docs/user-guide.md");
    assert!(guide.contains(&vhost_clone::service::capabilities_json()));
}
