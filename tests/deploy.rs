//! What ships beside the code: every YAML under deploy/ parses and the
//! sidecar manifest keeps its promises; the example config and the
//! ConfigMap's config pass `check-config`.

mod support;

use std::path::{Path, PathBuf};

use support::process::{command, write};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn load(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn every_yaml_under_deploy_parses_and_the_kustomization_lists_real_files() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let docs = load(f);
        assert!(!docs.is_empty(), "{} is empty", f.display());
        for d in &docs {
            assert!(
                d["apiVersion"].as_str().is_some(),
                "{}: no apiVersion",
                f.display()
            );
            assert!(d["kind"].as_str().is_some(), "{}: no kind", f.display());
        }
    }
    let base = root().join("deploy/kubernetes/base");
    let k = &load(&base.join("kustomization.yaml"))[0];
    for r in k["resources"].as_vec().unwrap() {
        let r = r.as_str().unwrap();
        assert!(base.join(r).is_file(), "kustomization names missing {r}");
    }
}

#[test]
fn the_sidecar_is_probed_limited_and_locked_down() {
    let base = root().join("deploy/kubernetes/base");
    let docs = load(&base.join("deployment.yaml"));
    let spec = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let proxy = spec["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("criteo-token-proxy"))
        .expect("the proxy sidecar");
    assert_eq!(
        proxy["restartPolicy"].as_str(),
        Some("Always"),
        "a native sidecar"
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        proxy["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert!(proxy["resources"]["requests"]["memory"].as_str().is_some());
    assert!(proxy["resources"]["limits"]["memory"].as_str().is_some());
    let mounts: Vec<&str> = proxy["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&"/var/lib/criteo-token-proxy"),
        "a writable store"
    );
    assert!(
        !spec["containers"].as_vec().unwrap().is_empty(),
        "an app container"
    );
    let replicas = kind(&docs, "Deployment")["spec"]["replicas"].as_i64();
    assert_eq!(replicas, Some(1));
}

/// Runs `check-config` on `config`, pointing every secret file at a temp
/// file through the environment, as an operator's mounted secrets would.
fn check(config: &Path, env: &[(&str, String)]) -> (bool, String) {
    let out = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = command();
            c.args(["check-config", "--config", config.to_str().unwrap()]);
            for (k, v) in env {
                c.env(k, v);
            }
            c.output().await.unwrap()
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_example_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "secret", "s3cret\n");
    let s = secret.display().to_string();
    let (ok, stderr) = check(
        &root().join("config/example.toml"),
        &[
            ("CRITEO_PROXY_CONSENT__SIGNING_SECRET_FILE", s.clone()),
            ("CRITEO_PROXY_TENANTS__MAIN__CLIENT_SECRET_FILE", s.clone()),
            ("CRITEO_PROXY_TENANTS__ACME__CLIENT_SECRET_FILE", s),
            (
                "CRITEO_PROXY_STORE__PATH",
                dir.path().join("tokens.json").display().to_string(),
            ),
        ],
    );
    assert!(ok, "{stderr}");
}

#[test]
fn the_configmap_config_passes_check_config() {
    let docs = load(&root().join("deploy/kubernetes/base/configmap.yaml"));
    let toml = kind(&docs, "ConfigMap")["data"]["proxy.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &toml);
    let secret = write(dir.path(), "secret", "s3cret\n");
    let (ok, stderr) = check(
        &path,
        &[
            (
                "CRITEO_PROXY_TENANTS__MAIN__CLIENT_SECRET_FILE",
                secret.display().to_string(),
            ),
            (
                "CRITEO_PROXY_STORE__PATH",
                dir.path().join("tokens.json").display().to_string(),
            ),
        ],
    );
    assert!(ok, "{stderr}");
}
