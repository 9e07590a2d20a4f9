//! What ships beside the code: every YAML under deploy/ parses and the
//! sidecar manifest keeps its promises; the example config and the
//! ConfigMap's config pass `check-config`. The single-replica base keeps
//! one writer on its volume; the overlay for several replicas is in
//! `deploy/replicas.rs`.

mod support;

/// The overlay for several replicas (deploy/kubernetes/overlays/replicas).
#[path = "deploy/replicas.rs"]
mod replicas;

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
    let kustomizations: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.ends_with("kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 2, "the base and the overlay");
    for k in kustomizations {
        let dir = k.parent().unwrap();
        let k = &load(k)[0];
        for r in k["resources"].as_vec().unwrap() {
            let r = dir.join(r.as_str().unwrap());
            assert!(
                r.is_file() || r.join("kustomization.yaml").is_file(),
                "kustomization names missing {}",
                r.display()
            );
        }
        for p in k["patches"].as_vec().map_or(&[][..], Vec::as_slice) {
            let p = dir.join(p["path"].as_str().unwrap());
            assert!(p.is_file(), "kustomization names missing {}", p.display());
        }
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

/// The `[store]` section's `key = "value"` lines of a ConfigMap's
/// `proxy.toml`, comments dropped.
fn store_section(toml: &str) -> Vec<(String, String)> {
    toml.lines()
        .map(str::trim)
        .skip_while(|l| *l != "[store]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("key = value");
            (k.trim().to_owned(), v.trim().trim_matches('"').to_owned())
        })
        .collect()
}

fn configmap_toml(path: &Path) -> String {
    kind(&load(path), "ConfigMap")["data"]["proxy.toml"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A rolling update, or a second replica, would run two proxies on one
/// SQLite file (the second refused by its lock, or, on another node, on a
/// volume it cannot attach): the base runs one, replaced by stopping it.
#[test]
fn the_single_replica_base_keeps_one_writer_on_its_volume() {
    let base = root().join("deploy/kubernetes/base");
    let docs = load(&base.join("deployment.yaml"));
    let deployment = &kind(&docs, "Deployment")["spec"];
    assert_eq!(deployment["replicas"].as_i64(), Some(1));
    assert_eq!(deployment["strategy"]["type"].as_str(), Some("Recreate"));

    let store = store_section(&configmap_toml(&base.join("configmap.yaml")));
    let keys: Vec<&str> = store.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["path"], "the embedded store");
    let path = Path::new(&store[0].1);

    let spec = &deployment["template"]["spec"];
    let proxy = spec["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("criteo-token-proxy"))
        .unwrap();
    let mount = proxy["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("store.path is on a mounted volume");
    assert!(mount["readOnly"].as_bool() != Some(true));
    let volume = spec["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let claim = volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("a persistent volume, not an emptyDir: tokens outlive the pod");
    let pvc = load(&base.join("pvc.yaml"));
    assert_eq!(
        kind(&pvc, "PersistentVolumeClaim")["metadata"]["name"].as_str(),
        Some(claim)
    );
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

/// Does this `ports` entry of a NetworkPolicy rule admit TCP `port` (whose
/// container port is named `name`)?
fn admits(entry: &Yaml, port: i64, name: &str) -> bool {
    let tcp = entry["protocol"].as_str().unwrap_or("TCP") == "TCP";
    let hit = match (&entry["port"], entry["endPort"].as_i64()) {
        (Yaml::BadValue, _) => true, // no port: every port
        (Yaml::String(s), _) => s == name,
        (p, None) => p.as_i64() == Some(port),
        (p, Some(end)) => p
            .as_i64()
            .is_some_and(|start| (start..=end).contains(&port)),
    };
    tcp && hit
}

#[test]
fn a_network_policy_keeps_the_admin_port_from_the_cluster() {
    let base = root().join("deploy/kubernetes/base");
    let k = &load(&base.join("kustomization.yaml"))[0];
    assert!(
        k["resources"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|r| r.as_str() == Some("networkpolicy.yaml")),
        "the kustomization applies the policy"
    );
    let docs = load(&base.join("deployment.yaml"));
    let template = &kind(&docs, "Deployment")["spec"]["template"];
    let proxy = template["spec"]["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("criteo-token-proxy"))
        .unwrap();
    let admin_port = proxy["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("the admin port");
    assert_eq!(admin_port, 9090);

    let docs = load(&base.join("networkpolicy.yaml"));
    let spec = &kind(&docs, "NetworkPolicy")["spec"];
    // It selects the pods the proxy runs in.
    let selector = spec["podSelector"]["matchLabels"].as_hash().unwrap();
    assert!(!selector.is_empty());
    assert!(spec["podSelector"]["matchExpressions"].is_badvalue());
    for (key, value) in selector {
        assert_eq!(
            &template["metadata"]["labels"][key.as_str().unwrap()],
            value,
            "the policy selects the proxy's pods"
        );
    }
    let types: Vec<&str> = spec["policyTypes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(types.contains(&"Ingress"));
    // Every rule that admits the admin port names who may use it, and none
    // of those is "anyone".
    let rules = spec["ingress"].as_vec().unwrap();
    let mut restricted = 0;
    for rule in rules {
        let admits_admin = match rule["ports"].as_vec() {
            None => true,
            Some(ports) => ports.iter().any(|p| admits(p, admin_port, "admin")),
        };
        if !admits_admin {
            continue;
        }
        let from = rule["from"]
            .as_vec()
            .expect("a rule admitting 9090 names its sources");
        assert!(!from.is_empty());
        for peer in from {
            let open = peer.as_hash().is_none_or(|h| h.is_empty())
                || ["0.0.0.0/0", "::/0"].contains(&peer["ipBlock"]["cidr"].as_str().unwrap_or(""))
                || (peer["podSelector"].as_hash().is_some_and(|h| h.is_empty())
                    && peer["namespaceSelector"]
                        .as_hash()
                        .is_some_and(|h| h.is_empty()));
            assert!(!open, "port {admin_port} is open to anyone: {peer:?}");
        }
        restricted += 1;
    }
    assert!(restricted >= 1, "Prometheus can still scrape /metrics");
    // The app's other ports stay reachable.
    assert!(rules.iter().any(|r| {
        r["from"].is_badvalue()
            && r["ports"]
                .as_vec()
                .is_some_and(|p| p.iter().any(|e| admits(e, 8000, "http")))
    }));
}

/// `check-config`'s output for `config`, and whether that output passes
/// `check-config` again (with no environment) and prints the same.
fn round_trip(config: &Path, env: &[(&str, String)], dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = |path: &Path, env: &[(&str, String)]| {
        rt.block_on(async {
            let mut c = command();
            c.args(["check-config", "--config", path.to_str().unwrap()]);
            for (k, v) in env {
                c.env(k, v);
            }
            c.output().await.unwrap()
        })
    };
    let first = run(config, env);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let printed = String::from_utf8(first.stdout).unwrap();
    let again = write(dir, "printed.toml", &printed);
    let second = run(&again, &[]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}\n{printed}");
    assert_eq!(String::from_utf8(second.stdout).unwrap(), printed);
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn the_example_config_as_printed_by_check_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "secret", "s3cret\n");
    let s = secret.display().to_string();
    round_trip(
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
        dir.path(),
    );
}

#[test]
fn the_configmap_config_as_printed_by_check_config_passes_check_config() {
    let docs = load(&root().join("deploy/kubernetes/base/configmap.yaml"));
    let toml = kind(&docs, "ConfigMap")["data"]["proxy.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &toml);
    let secret = write(dir.path(), "secret", "s3cret\n");
    round_trip(
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
        dir.path(),
    );
}
