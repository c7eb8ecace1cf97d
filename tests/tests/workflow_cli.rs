//! The workflow developer tools through the real `grizzly` binary, no broker: `validate` (every
//! malformed file gets its precise error), `test` (scripted handler outputs), `docs` (Markdown +
//! Mermaid) and `schema` (JSON Schema for editors).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use grizzly_tests::bin_path;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn grizzly(args: &[&str]) -> Output {
    Command::new(bin_path("grizzly"))
        .current_dir(root())
        .env("GRIZZLY_HANDLERS_DIR", root().join("handlers"))
        .env("GRIZZLY_WORKFLOWS_DIR", root().join("workflows"))
        .args(args)
        .output()
        .expect("run grizzly (cargo build --workspace first)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_example_workflows_validate_and_their_tests_pass() {
    let out = grizzly(&["workflow", "validate"]);
    assert!(out.status.success(), "{}", text(&out));
    for name in ["code_review", "provision", "batch", "invoice_reminder"] {
        assert!(
            text(&out).contains(&format!("ok ({name} v")),
            "{}",
            text(&out)
        );
    }
    let tests: Vec<String> = std::fs::read_dir(root().join("workflows/tests"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["workflow", "test"];
    args.extend(tests.iter().map(String::as_str));
    let out = grizzly(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(" 0 failed"), "{}", text(&out));
}

#[test]
fn each_malformed_workflow_gets_its_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let cases = [
        (
            write("syntax.yaml", "name: w\ndo: [\n  - id: a\n"),
            "syntax.yaml:",
        ),
        (
            write(
                "unknown_handler.yaml",
                "name: w\ndo:\n  - id: a\n    call: no_such_handler\n",
            ),
            "unknown_handler.yaml:4:11: call: unknown handler `no_such_handler`",
        ),
        (
            write(
                "unknown_key.yaml",
                "name: w\ndo:\n  - id: a\n    call: echo\n    retries: 3\n",
            ),
            "unknown_key.yaml:5:",
        ),
        (
            write(
                "bad_expr.yaml",
                "name: w\ndo:\n  - id: a\n    if: \"input.n >\"\n    call: echo\n",
            ),
            "bad_expr.yaml:4:",
        ),
        (
            write(
                "duplicate.yaml",
                "name: w\ndo:\n  - id: a\n    call: echo\n  - id: a\n    call: echo\n",
            ),
            "duplicate step id `a`",
        ),
        (
            write(
                "unreachable.yaml",
                "name: w\ndo:\n  - id: a\n    call: echo\n    then: end\n  - id: b\n    call: echo\n",
            ),
            "`b` is unreachable",
        ),
    ];
    for (path, expected) in &cases {
        let out = grizzly(&["workflow", "validate", path]);
        assert!(!out.status.success(), "{path} was accepted");
        assert!(text(&out).contains(expected), "{path}: {}", text(&out));
    }
    // A good file next to bad ones is still reported as fine; the run fails as a whole.
    let good = write("good.yaml", "name: good\ndo:\n  - id: a\n    call: echo\n");
    let out = grizzly(&["workflow", "validate", &good, &cases[1].0]);
    assert!(!out.status.success());
    assert!(text(&out).contains("ok (good v1)"), "{}", text(&out));
}

#[test]
fn a_failing_workflow_test_case_fails_the_run_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("provision.test.yaml");
    let body = std::fs::read_to_string(root().join("workflows/tests/provision.test.yaml"))
        .unwrap()
        .replace(
            "workflow: ../provision.yaml",
            &format!(
                "workflow: {}",
                root().join("workflows/provision.yaml").display()
            ),
        )
        .replacen("status: completed", "status: failed", 1);
    std::fs::write(&case, body).unwrap();
    let out = grizzly(&["workflow", "test", case.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("everything provisioned"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("1 failed"), "{}", text(&out));
    // A test file that is not a test file.
    let junk = dir.path().join("junk.test.yaml");
    std::fs::write(&junk, "cases: 3\n").unwrap();
    let out = grizzly(&["workflow", "test", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("junk.test.yaml"), "{}", text(&out));
}

#[test]
fn docs_render_markdown_with_a_mermaid_diagram_and_the_schema_is_json_schema() {
    let out = grizzly(&["workflow", "docs", "workflows/provision.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("# Workflow `provision`"), "{md}");
    assert!(md.contains("```mermaid\nflowchart TD"), "{md}");
    for step in ["network", "database", "app", "undo database"] {
        assert!(md.contains(step), "{step} missing: {md}");
    }
    let out = grizzly(&["workflow", "docs", "workflows/nope.yaml"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nope.yaml"), "{}", text(&out));

    let out = grizzly(&["workflow", "schema"]);
    assert!(out.status.success(), "{}", text(&out));
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        schema["$defs"].is_object() && schema["properties"]["do"].is_object(),
        "{schema}"
    );
}

/// `grizzly … | head`: a reader that has gone ends the command the way SIGPIPE would (status
/// 141, nothing on stderr), not with a panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin_path("grizzly"))
        .current_dir(root())
        .env("GRIZZLY_HANDLERS_DIR", root().join("handlers"))
        .env("GRIZZLY_WORKFLOWS_DIR", root().join("workflows"))
        .args(["workflow", "validate"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));
}
