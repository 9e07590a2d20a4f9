//! The overlay for several replicas: three pods rolled one at a time on a
//! PostgreSQL store whose URL is a file mounted from a Secret, and no
//! volume claim. Checked in its files (the kustomization and its patches)
//! and, where `kubectl` or `kustomize` is installed, as rendered.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::support::process::write;
use super::{check, configmap_toml, kind, load, root, round_trip, store_section};

fn overlay() -> PathBuf {
    root().join("deploy/kubernetes/overlays/replicas")
}

fn base() -> PathBuf {
    root().join("deploy/kubernetes/base")
}

fn proxy_of(pod_spec: &Yaml) -> &Yaml {
    pod_spec["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("criteo-token-proxy"))
        .expect("the proxy sidecar")
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[][..], Vec::as_slice)
}

fn deleted(y: &Yaml) -> bool {
    y["$patch"].as_str() == Some("delete")
}

/// The base's store volume: its name and where it is mounted.
fn base_store_volume() -> (String, String) {
    let docs = load(&base().join("deployment.yaml"));
    let spec = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let volume = list(&spec["volumes"])
        .iter()
        .find(|v| !v["persistentVolumeClaim"].is_badvalue())
        .expect("the base's volume claim");
    let name = volume["name"].as_str().unwrap();
    let mount = list(&proxy_of(spec)["volumeMounts"])
        .iter()
        .find(|m| m["name"].as_str() == Some(name))
        .unwrap();
    (
        name.to_owned(),
        mount["mountPath"].as_str().unwrap().to_owned(),
    )
}

/// Checks that `url_file` is a key of a Secret mounted in the proxy: a
/// volume of `pod_spec` mounted at its folder, from a Secret of `secrets`
/// that has a key named like the file.
fn url_file_from_a_secret(url_file: &str, pod_spec: &Yaml, secrets: &[&Yaml]) {
    let url_file = Path::new(url_file);
    let (folder, key) = (url_file.parent().unwrap(), url_file.file_name().unwrap());
    let mount = list(&proxy_of(pod_spec)["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(folder))
        .unwrap_or_else(|| panic!("nothing mounted at {}", folder.display()));
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let volume = list(&pod_spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    let name = volume["secret"]["secretName"]
        .as_str()
        .expect("the URL comes from a Secret");
    let secret = secrets
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no Secret {name}"));
    let key = key.to_str().unwrap();
    assert!(
        !secret["stringData"][key].is_badvalue() || !secret["data"][key].is_badvalue(),
        "Secret {name} has no key {key}"
    );
}

#[test]
fn the_overlay_runs_three_replicas_rolling_on_a_shared_store_without_a_volume() {
    let k = &load(&overlay().join("kustomization.yaml"))[0];
    let resources: Vec<&str> = list(&k["resources"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(resources.contains(&"../../base"), "{resources:?}");
    let patches: Vec<&str> = list(&k["patches"])
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    let patch_docs: Vec<Yaml> = patches
        .iter()
        .flat_map(|p| load(&overlay().join(p)))
        .collect();

    let patch = kind(&patch_docs, "Deployment");
    assert_eq!(patch["metadata"]["name"].as_str(), Some("criteo-app"));
    let spec = &patch["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(3));
    assert_eq!(spec["strategy"]["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_i64(),
        Some(0)
    );
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxSurge"].as_i64(),
        Some(1)
    );

    // The base's store volume and its mount are deleted, its claim too.
    let pod = &spec["template"]["spec"];
    let (volume, mount_path) = base_store_volume();
    assert!(
        list(&pod["volumes"])
            .iter()
            .any(|v| v["name"].as_str() == Some(&volume) && deleted(v)),
        "the overlay deletes the volume {volume}"
    );
    assert!(
        list(&proxy_of(pod)["volumeMounts"])
            .iter()
            .any(|m| m["mountPath"].as_str() == Some(&mount_path) && deleted(m)),
        "the overlay deletes the mount at {mount_path}"
    );
    let claim =
        kind(&load(&base().join("pvc.yaml")), "PersistentVolumeClaim")["metadata"]["name"].clone();
    let pvc = kind(&patch_docs, "PersistentVolumeClaim");
    assert!(pvc["metadata"]["name"] == claim && deleted(pvc));

    // [store] names a file of a Secret the overlay mounts, and nothing else.
    let config = kind(&patch_docs, "ConfigMap");
    let store = store_section(config["data"]["proxy.toml"].as_str().unwrap());
    let [(key, url_file)] = &store[..] else {
        panic!("one key in [store]: {store:?}")
    };
    assert_eq!(key, "url_file");
    let secrets: Vec<Yaml> = resources
        .iter()
        .filter(|r| r.ends_with(".yaml"))
        .flat_map(|r| load(&overlay().join(r)))
        .collect();
    let secrets: Vec<&Yaml> = secrets
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Secret"))
        .collect();
    url_file_from_a_secret(url_file, pod, &secrets);
}

/// The overlay as `kubectl kustomize` (or `kustomize build`) renders it;
/// `None`, said loudly, where neither is installed.
fn rendered() -> Option<Vec<Yaml>> {
    let dir = overlay();
    let tries: [(&str, &[&str]); 2] = [("kubectl", &["kustomize"]), ("kustomize", &["build"])];
    for (tool, args) in tries {
        match std::process::Command::new(tool)
            .args(args)
            .arg(&dir)
            .output()
        {
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "{tool} cannot render the overlay: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout).unwrap();
                return Some(YamlLoader::load_from_str(&text).unwrap());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{tool}: {e}"),
        }
    }
    eprintln!(
        "SKIPPED: neither kubectl nor kustomize is installed; the overlay was checked in its files only"
    );
    None
}

#[test]
fn the_overlay_renders_three_rolling_replicas_with_no_volume_claim() {
    let Some(docs) = rendered() else { return };
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str() == Some("PersistentVolumeClaim")),
        "no claim is applied"
    );
    let deployment = kind(&docs, "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(3));
    assert_eq!(spec["strategy"]["type"].as_str(), Some("RollingUpdate"));
    let pod = &spec["template"]["spec"];
    assert!(
        list(&pod["volumes"])
            .iter()
            .all(|v| v["persistentVolumeClaim"].is_badvalue()),
        "no volume claim in the pod"
    );
    let proxy = proxy_of(pod);
    let (volume, _) = base_store_volume();
    assert!(
        list(&proxy["volumeMounts"])
            .iter()
            .all(|m| m["name"].as_str() != Some(&volume)),
        "the store's mount is gone with its volume"
    );
    // What the base promised of the sidecar is still there.
    assert_eq!(proxy["restartPolicy"].as_str(), Some("Always"));
    assert_eq!(
        proxy["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        proxy["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );

    let store = store_section(
        kind(&docs, "ConfigMap")["data"]["proxy.toml"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(store.len(), 1, "{store:?}");
    assert_eq!(store[0].0, "url_file");
    let secrets: Vec<&Yaml> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Secret"))
        .collect();
    url_file_from_a_secret(&store[0].1, pod, &secrets);
}

/// `proxy.toml` without its `[store]` section.
fn all_but_the_store(toml: &str) -> Vec<&str> {
    let mut in_store = false;
    toml.lines()
        .filter(|l| {
            if l.starts_with('[') {
                in_store = *l == "[store]";
            }
            !in_store
        })
        .collect()
}

#[test]
fn the_overlay_config_is_the_base_config_but_for_its_store() {
    let base = configmap_toml(&base().join("configmap.yaml"));
    let overlay = configmap_toml(&overlay().join("configmap-patch.yaml"));
    assert_eq!(all_but_the_store(&overlay), all_but_the_store(&base));
}

#[test]
fn the_overlay_config_passes_check_config() {
    let toml = configmap_toml(&overlay().join("configmap-patch.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "proxy.toml", &toml);
    let secret = write(dir.path(), "secret", "s3cret\n");
    let url = write(
        dir.path(),
        "url",
        "postgres://criteo_proxy:s3cret@127.0.0.1:5432/criteo\n",
    );
    let env = [
        (
            "CRITEO_PROXY_TENANTS__MAIN__CLIENT_SECRET_FILE",
            secret.display().to_string(),
        ),
        ("CRITEO_PROXY_STORE__URL_FILE", url.display().to_string()),
    ];
    let (ok, stderr) = check(&path, &env);
    assert!(ok, "{stderr}");
    round_trip(&path, &env, dir.path());
}
