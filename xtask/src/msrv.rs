//! `cargo xtask msrv`: the `rust-version` each publishable crate claims covers what its
//! dependency tree needs, read from `cargo metadata --all-features`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A `rust-version` as numbers (`1.86` and `1.86.0` compare equal).
fn parse(v: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    while parts.len() < 3 {
        parts.push(0);
    }
    parts
}

/// Checks every workspace crate that is published; prints what each needs and who needs it most.
pub fn check(root: &Path) -> Result<()> {
    eprintln!("xtask: msrv");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--all-features"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("reading cargo metadata's JSON")?;
    let packages: HashMap<&str, &Value> = meta["packages"]
        .as_array()
        .context("metadata without packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let members: HashSet<&str> = meta["workspace_members"]
        .as_array()
        .context("no workspace_members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Each package's normal and build dependencies (dev-dependencies are not a user's to build).
    let mut needs: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in meta["resolve"]["nodes"].as_array().context("metadata without a resolve graph")? {
        let Some(id) = node["id"].as_str() else { continue };
        let deps = node["deps"].as_array().into_iter().flatten().filter(|d| {
            d["dep_kinds"].as_array().into_iter().flatten().any(|k| k["kind"].is_null() || k["kind"] == "build")
        });
        needs.insert(id, deps.filter_map(|d| d["pkg"].as_str()).collect());
    }
    let mut failures = Vec::new();
    let mut report = BTreeMap::new();
    for &member in &members {
        let pkg = packages[member];
        let name = pkg["name"].as_str().unwrap_or("?");
        if pkg["publish"].as_array().is_some_and(Vec::is_empty) {
            continue; // publish = false: never built by a user with another toolchain
        }
        let claimed = pkg["rust_version"].as_str().with_context(|| format!("{name} claims no rust-version"))?;
        let (mut seen, mut stack, mut highest) = (HashSet::new(), vec![member], None::<(Vec<u64>, String)>);
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            stack.extend(needs.get(id).into_iter().flatten());
            if id == member {
                continue;
            }
            let dep = packages[id];
            if let Some(rv) = dep["rust_version"].as_str() {
                let v = parse(rv);
                if highest.as_ref().is_none_or(|(h, _)| v > *h) {
                    let who = format!("{} {} (rust-version {rv})", dep["name"].as_str().unwrap_or("?"), dep["version"]);
                    highest = Some((v, who.replace('"', "")));
                }
            }
        }
        let Some((need, who)) = highest else { continue };
        if parse(claimed) < need {
            failures.push(format!("{name} claims rust-version {claimed}, but {who} needs more"));
        }
        report.insert(name.to_owned(), format!("claims {claimed}; the most demanding dependency is {who}"));
    }
    for (name, line) in &report {
        eprintln!("  {name}: {line}");
    }
    if !failures.is_empty() {
        bail!("rust-version too low:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
