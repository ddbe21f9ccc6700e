//! The deployment files in `deploy/` agree with each other and with `keel broker`: Kubernetes
//! selectors, ports, probe paths, volume names and config keys; the systemd unit's command line and
//! hardening; the example TOML files' keys. Files only: no network, no Docker, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

const NAME_LABEL: &str = "app.kubernetes.io/name";
const GRPC_PORT: i64 = 9292;
const METRICS_PORT: i64 = 9392;
/// The runtime user of both image builds.
const IMAGE_UID: i64 = 65532;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// What `keel broker` accepts, read from its source so this test notices when it changes.

fn broker_source() -> String {
    read("crates/keel-cli/src/broker_cmd.rs")
}

/// The fields of `FileConfig`: the keys `keel broker --config` accepts (it denies unknown ones).
fn accepted_toml_keys() -> BTreeSet<String> {
    let src = broker_source();
    let start = src
        .find("struct FileConfig {")
        .expect("FileConfig in broker_cmd.rs");
    let body = &src[start..];
    let body = &body[body.find('{').expect("{") + 1..body.find('}').expect("}")];
    let keys: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, _)| k.trim().to_owned())
        .collect();
    let expected = [
        "id",
        "data_dir",
        "listen",
        "advertise",
        "metrics_listen",
        "initial_cluster",
        "join",
        "retention_check_interval_ms",
    ];
    for k in expected {
        assert!(keys.contains(k), "FileConfig has no {k}: {keys:?}");
    }
    keys
}

/// The `KEEL_*` variables `keel broker` reads (`env = "KEEL_…"` in its clap arguments).
fn accepted_env_vars() -> BTreeSet<String> {
    let src = broker_source();
    let vars: BTreeSet<String> = src
        .split("env = \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_owned)
        .collect();
    assert!(vars.contains("KEEL_ID") && vars.contains("KEEL_ADVERTISE"));
    vars
}

/// Parses a keel.toml and checks it only uses accepted keys, with values of the right shape.
fn check_keel_toml(what: &str, text: &str) -> toml::Table {
    let table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{what} is not valid TOML: {e}"));
    let accepted = accepted_toml_keys();
    for (k, v) in &table {
        assert!(
            accepted.contains(k),
            "{what}: `keel broker --config` rejects key {k:?}; it accepts {accepted:?}"
        );
        match k.as_str() {
            "id" => assert!(v.as_integer().is_some_and(|i| i >= 1), "{what}: id {v:?}"),
            "retention_check_interval_ms" => {
                assert!(v.as_integer().is_some_and(|i| i >= 1), "{what}: {k} {v:?}")
            }
            "listen" | "metrics_listen" => {
                let s = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {k} is a string"));
                s.parse::<SocketAddr>()
                    .unwrap_or_else(|e| panic!("{what}: {k} {s:?} is not IP:PORT: {e}"));
            }
            "initial_cluster" => {
                let s = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: {k} is a string"));
                check_initial_cluster(what, s);
            }
            _ => assert!(v.is_str(), "{what}: {k} should be a string, is {v:?}"),
        }
    }
    table
}

/// `1=HOST:PORT,2=HOST:PORT,…`: ids >= 1, unique, each with a host and a port. Returns them.
fn check_initial_cluster(what: &str, s: &str) -> BTreeMap<u32, String> {
    let mut members = BTreeMap::new();
    for entry in s.split(',') {
        let (id, addr) = entry
            .split_once('=')
            .unwrap_or_else(|| panic!("{what}: initial cluster entry {entry:?} is not ID=ADDR"));
        let id: u32 = id
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{what}: id {id:?}: {e}"));
        assert!(id >= 1, "{what}: ids start at 1");
        let (host, port) = addr
            .trim()
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{what}: {addr:?} has no port"));
        assert!(!host.is_empty(), "{what}: {addr:?} has no host");
        port.parse::<u16>()
            .unwrap_or_else(|e| panic!("{what}: port of {addr:?}: {e}"));
        assert!(
            members.insert(id, addr.trim().to_owned()).is_none(),
            "{what}: id {id} twice"
        );
    }
    members
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct Manifests {
    /// (file name, document) for every document in deploy/kubernetes/*.yaml.
    docs: Vec<(String, Yaml)>,
}

impl Manifests {
    fn load() -> Self {
        let dir = repo().join("deploy/kubernetes");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for f in files {
            let name = f
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&f).expect("read manifest");
            let parsed = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            for doc in parsed {
                assert!(
                    str_of(&doc["kind"]).is_some() && str_of(&doc["apiVersion"]).is_some(),
                    "{name}: a document without kind/apiVersion"
                );
                docs.push((name.clone(), doc));
            }
        }
        Self { docs }
    }

    fn all_of(&self, kind: &str) -> Vec<&(String, Yaml)> {
        self.docs
            .iter()
            .filter(|(_, d)| str_of(&d["kind"]) == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Yaml {
        let all = self.all_of(kind);
        assert_eq!(all.len(), 1, "expected exactly one {kind}");
        &all[0].1
    }

    fn service(&self, headless: bool) -> &Yaml {
        let all: Vec<_> = self
            .all_of("Service")
            .into_iter()
            .filter(|(_, d)| (str_of(&d["spec"]["clusterIP"]) == Some("None")) == headless)
            .collect();
        assert_eq!(
            all.len(),
            1,
            "expected one {} Service",
            if headless { "headless" } else { "client" }
        );
        &all[0].1
    }
}

fn str_of(y: &Yaml) -> Option<&str> {
    y.as_str()
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, is {y:?}"))
}

fn int(y: &Yaml, what: &str) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("{what} should be an integer, is {y:?}"))
}

fn list<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what} should be a list, is {y:?}"))
}

fn labels(y: &Yaml, what: &str) -> BTreeMap<String, String> {
    let h = y
        .as_hash()
        .unwrap_or_else(|| panic!("{what} should be a map of labels, is {y:?}"));
    h.iter()
        .map(|(k, v)| (s(k, what).to_owned(), s(v, what).to_owned()))
        .collect()
}

/// True when every label of `selector` is on `pod` (how Kubernetes matches), and there is one.
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// Named container ports of the broker container: name -> number.
fn container_ports(container: &Yaml) -> BTreeMap<String, i64> {
    list(&container["ports"], "container ports")
        .iter()
        .map(|p| {
            (
                s(&p["name"], "container port name").to_owned(),
                int(&p["containerPort"], "containerPort"),
            )
        })
        .collect()
}

/// Resolves a port reference (a name or a number) against the container's ports.
fn resolve_port(port: &Yaml, ports: &BTreeMap<String, i64>, what: &str) -> i64 {
    match port {
        Yaml::Integer(n) => {
            assert!(
                ports.values().any(|p| p == n),
                "{what}: no container port {n}"
            );
            *n
        }
        Yaml::String(name) => *ports
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no container port named {name:?} in {ports:?}")),
        other => panic!("{what}: bad port {other:?}"),
    }
}

fn broker_container(sts: &Yaml) -> &Yaml {
    let containers = list(&sts["spec"]["template"]["spec"]["containers"], "containers");
    containers
        .iter()
        .find(|c| str_of(&c["name"]) == Some("keel"))
        .expect("a container named keel")
}

fn env_list(container: &Yaml) -> Vec<(String, &Yaml)> {
    list(&container["env"], "env")
        .iter()
        .map(|e| (s(&e["name"], "env name").to_owned(), e))
        .collect()
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> &'a str {
    let env = list(&container["env"], "env");
    let e = env
        .iter()
        .find(|e| str_of(&e["name"]) == Some(name))
        .unwrap_or_else(|| panic!("the broker container sets no {name}"));
    s(&e["value"], name)
}

#[test]
fn every_manifest_is_labelled_and_listed_in_the_kustomization() {
    let m = Manifests::load();
    let mut resources = BTreeSet::new();
    for (file, doc) in &m.docs {
        if str_of(&doc["kind"]) == Some("Kustomization") {
            for r in list(&doc["resources"], "kustomization resources") {
                resources.insert(s(r, "resource").to_owned());
            }
            continue;
        }
        let l = labels(&doc["metadata"]["labels"], &format!("{file} labels"));
        assert_eq!(
            l.get(NAME_LABEL).map(String::as_str),
            Some("keel"),
            "{file}: {NAME_LABEL} should be keel"
        );
        assert!(
            str_of(&doc["metadata"]["name"]).is_some(),
            "{file}: no metadata.name"
        );
        assert!(
            doc["metadata"]["namespace"].is_badvalue(),
            "{file}: leave the namespace to `kubectl -n`"
        );
    }
    let files: BTreeSet<String> = m
        .docs
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources, files,
        "kustomization.yaml should list exactly the other manifests"
    );
}

#[test]
fn selectors_bind_the_statefulset_services_and_pdb() {
    let m = Manifests::load();
    let sts = m.one("StatefulSet");
    let pod_labels = labels(
        &sts["spec"]["template"]["metadata"]["labels"],
        "pod template labels",
    );
    assert_eq!(pod_labels.get(NAME_LABEL).map(String::as_str), Some("keel"));
    let sts_selector = labels(
        &sts["spec"]["selector"]["matchLabels"],
        "StatefulSet selector",
    );
    assert!(
        selects(&sts_selector, &pod_labels),
        "StatefulSet selector {sts_selector:?} does not match its pods {pod_labels:?}"
    );

    let headless = m.service(true);
    assert_eq!(
        s(&headless["metadata"]["name"], "headless name"),
        s(&sts["spec"]["serviceName"], "serviceName"),
        "the StatefulSet's serviceName must be the headless Service"
    );
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "brokers must resolve each other before they are ready"
    );
    let client = m.service(false);
    for (what, svc) in [("headless", headless), ("client", client)] {
        let sel = labels(
            &svc["spec"]["selector"],
            &format!("{what} Service selector"),
        );
        assert!(
            selects(&sel, &pod_labels),
            "the {what} Service selects {sel:?}, which the pods {pod_labels:?} do not carry"
        );
    }

    let pdb = m.one("PodDisruptionBudget");
    let pdb_sel = labels(&pdb["spec"]["selector"]["matchLabels"], "PDB selector");
    assert!(selects(&pdb_sel, &pod_labels), "the PDB selects no broker");
    assert_eq!(
        pdb_sel, sts_selector,
        "the PDB covers exactly the StatefulSet"
    );
    assert_eq!(int(&pdb["spec"]["maxUnavailable"], "maxUnavailable"), 1);

    // Anti-affinity terms, where present, name the brokers too.
    let aff = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    if let Some(terms) = aff.as_vec() {
        for t in terms {
            let sel = labels(
                &t["podAffinityTerm"]["labelSelector"]["matchLabels"],
                "anti-affinity selector",
            );
            assert!(
                selects(&sel, &pod_labels),
                "anti-affinity selects no broker"
            );
        }
    }
}

#[test]
fn ports_and_probes_line_up() {
    let m = Manifests::load();
    let sts = m.one("StatefulSet");
    let c = broker_container(sts);
    let ports = container_ports(c);
    assert_eq!(
        ports.get("grpc"),
        Some(&GRPC_PORT),
        "container ports {ports:?}"
    );
    assert_eq!(
        ports.get("metrics"),
        Some(&METRICS_PORT),
        "container ports {ports:?}"
    );

    for svc in [m.service(true), m.service(false)] {
        let name = s(&svc["metadata"]["name"], "service name");
        let mut seen = BTreeMap::new();
        for p in list(&svc["spec"]["ports"], "service ports") {
            let pname = s(&p["name"], "service port name");
            let target = if p["targetPort"].is_badvalue() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            let n = resolve_port(target, &ports, &format!("Service {name} port {pname}"));
            assert_eq!(
                ports.get(pname),
                Some(&n),
                "Service {name}: port {pname} should reach the container port of that name"
            );
            seen.insert(pname.to_owned(), int(&p["port"], "port"));
        }
        assert_eq!(seen.get("grpc"), Some(&GRPC_PORT), "Service {name}");
        assert_eq!(seen.get("metrics"), Some(&METRICS_PORT), "Service {name}");
    }

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(str_of(&get["path"]), Some(path), "{probe} path");
        assert_eq!(
            resolve_port(&get["port"], &ports, probe),
            METRICS_PORT,
            "{probe} must use the metrics port"
        );
    }
}

#[test]
fn volumes_config_and_broker_settings_line_up() {
    let m = Manifests::load();
    let sts = m.one("StatefulSet");
    let spec = &sts["spec"];
    let pod = &spec["template"]["spec"];
    let c = broker_container(sts);

    assert_eq!(int(&spec["replicas"], "replicas"), 3);
    assert_eq!(
        str_of(&spec["podManagementPolicy"]),
        Some("Parallel"),
        "a new cluster needs all its members started together"
    );
    assert!(
        int(
            &pod["terminationGracePeriodSeconds"],
            "terminationGracePeriodSeconds"
        ) >= 30,
        "graceful shutdown needs time"
    );
    let sc = &pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(int(&sc["runAsUser"], "runAsUser"), IMAGE_UID);
    assert_eq!(
        int(&sc["fsGroup"], "fsGroup"),
        IMAGE_UID,
        "the volume must be writable"
    );
    for r in ["cpu", "memory"] {
        assert!(
            !c["resources"]["requests"][r].is_badvalue(),
            "no {r} request"
        );
    }
    assert!(
        !c["resources"]["limits"]["memory"].is_badvalue(),
        "no memory limit"
    );

    // Volumes: every mount names a claim template or a pod volume; `data` is the claim.
    let mounts: BTreeMap<String, String> = list(&c["volumeMounts"], "volumeMounts")
        .iter()
        .map(|v| {
            (
                s(&v["name"], "mount name").to_owned(),
                s(&v["mountPath"], "mountPath").to_owned(),
            )
        })
        .collect();
    let claims: BTreeSet<String> = list(&spec["volumeClaimTemplates"], "volumeClaimTemplates")
        .iter()
        .map(|t| s(&t["metadata"]["name"], "claim name").to_owned())
        .collect();
    let volumes: BTreeMap<String, &Yaml> = list(&pod["volumes"], "volumes")
        .iter()
        .map(|v| (s(&v["name"], "volume name").to_owned(), v))
        .collect();
    assert!(claims.contains("data"), "claims {claims:?}");
    for claim in &claims {
        assert!(
            mounts.contains_key(claim),
            "claim template {claim} is not mounted"
        );
        assert!(
            !volumes.contains_key(claim),
            "{claim} is both a claim and a volume"
        );
    }
    for name in mounts.keys() {
        assert!(
            claims.contains(name) || volumes.contains_key(name),
            "mount {name} names no volume"
        );
    }

    // Config: the mounted ConfigMap holds the keel.toml that --config names.
    let cm = m.one("ConfigMap");
    let cm_name = s(&cm["metadata"]["name"], "ConfigMap name");
    let config_volume = volumes
        .iter()
        .find(|(_, v)| str_of(&v["configMap"]["name"]) == Some(cm_name))
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| panic!("no volume mounts ConfigMap {cm_name}"));
    let config_dir = mounts
        .get(&config_volume)
        .unwrap_or_else(|| panic!("volume {config_volume} is not mounted"));
    let args: Vec<&str> = list(&c["args"], "args")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(args.first(), Some(&"broker"), "args {args:?}");
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("the broker is started with --config");
    let key = config_path
        .strip_prefix(config_dir.as_str())
        .and_then(|k| k.strip_prefix('/'))
        .unwrap_or_else(|| panic!("--config {config_path} is not under {config_dir}"));
    let toml_text = s(&cm["data"][key], &format!("ConfigMap key {key}"));
    let conf = check_keel_toml("the ConfigMap's keel.toml", toml_text);

    // The settings agree with the volume and the ports.
    assert_eq!(
        conf.get("data_dir").and_then(|v| v.as_str()),
        mounts.get("data").map(String::as_str),
        "data_dir must be where the claim is mounted"
    );
    let ports = container_ports(c);
    for (key, port) in [("listen", "grpc"), ("metrics_listen", "metrics")] {
        let addr: SocketAddr = conf
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("the ConfigMap sets no {key}"))
            .parse()
            .expect("checked above");
        assert!(
            addr.ip().is_unspecified(),
            "{key} must accept connections from other pods"
        );
        assert_eq!(
            Some(&i64::from(addr.port())),
            ports.get(port),
            "{key} vs port {port}"
        );
    }

    // Environment: only variables the broker reads (plus the pod's own, used to build them),
    // each $(VAR) defined above its use, as Kubernetes requires.
    let accepted = accepted_env_vars();
    let mut defined = BTreeSet::new();
    for (name, e) in env_list(c) {
        if name.starts_with("KEEL_") {
            assert!(
                accepted.contains(&name),
                "keel broker does not read {name}; it reads {accepted:?}"
            );
        }
        if let Some(v) = str_of(&e["value"]) {
            for r in v.split("$(").skip(1) {
                let var = r.split(')').next().expect("split");
                assert!(
                    defined.contains(var),
                    "{name} uses $({var}) before it is defined"
                );
            }
        }
        defined.insert(name);
    }

    // Ids from the pod ordinal: pods keel-1..keel-N, ids 1..N.
    let start = int(&spec["ordinals"]["start"], "ordinals.start");
    assert_eq!(start, 1, "broker ids start at 1, so ordinals must too");
    let id_env = list(&c["env"], "env")
        .iter()
        .find(|e| str_of(&e["name"]) == Some("KEEL_ID"))
        .expect("KEEL_ID is set");
    assert_eq!(
        str_of(&id_env["valueFrom"]["fieldRef"]["fieldPath"]),
        Some("metadata.labels['apps.kubernetes.io/pod-index']")
    );

    // Stable DNS names: POD.HEADLESS.NAMESPACE.svc.cluster.local:GRPC.
    let sts_name = s(&sts["metadata"]["name"], "StatefulSet name");
    let svc = s(&spec["serviceName"], "serviceName");
    let dns = |pod: &str| format!("{pod}.{svc}.$(POD_NAMESPACE).svc.cluster.local:{GRPC_PORT}");
    assert_eq!(env_value(c, "KEEL_ADVERTISE"), dns("$(POD_NAME)"));
    let members =
        check_initial_cluster("KEEL_INITIAL_CLUSTER", env_value(c, "KEEL_INITIAL_CLUSTER"));
    let replicas = int(&spec["replicas"], "replicas");
    let expected: BTreeMap<u32, String> = (start..start + replicas)
        .map(|i| {
            (
                u32::try_from(i).expect("small"),
                dns(&format!("{sts_name}-{i}")),
            )
        })
        .collect();
    assert_eq!(
        members, expected,
        "every pod, by its stable name and ordinal"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `[Service]` settings of a unit file: key -> values (a key may repeat).
fn unit_section(text: &str, section: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_owned();
            continue;
        }
        if current == section {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line {line:?} is not KEY=VALUE"));
            out.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    out
}

#[test]
fn systemd_unit_runs_the_broker_with_its_config_and_hardening() {
    let unit = read("deploy/systemd/keel.service");
    let svc = unit_section(&unit, "Service");
    let one = |k: &str| -> &str {
        let v = svc
            .get(k)
            .unwrap_or_else(|| panic!("keel.service sets no {k}"));
        v.last().expect("a value")
    };

    let exec = one("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        words.first().is_some_and(|w| w.starts_with('/')),
        "ExecStart needs an absolute path: {exec}"
    );
    assert_eq!(words.get(1), Some(&"broker"), "{exec}");
    let config = words
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .unwrap_or_else(|| panic!("ExecStart has no --config: {exec}"));
    assert_eq!(config, "/etc/keel/keel.toml");

    for (k, v) in [
        ("Type", "simple"),
        ("User", "keel"),
        ("Group", "keel"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(k), v, "keel.service: {k}");
    }
    assert!(!one("LimitNOFILE").is_empty());
    let stop: u64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(stop >= 30, "graceful shutdown needs time, got {stop}s");
    let families: BTreeSet<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    assert_eq!(
        families,
        BTreeSet::from(["AF_INET", "AF_INET6", "AF_UNIX"]),
        "RestrictAddressFamilies"
    );
    assert!(
        svc.get("SystemCallFilter").is_some_and(|v| v
            .iter()
            .any(|f| f.split_whitespace().any(|x| x == "@system-service"))),
        "SystemCallFilter=@system-service"
    );

    // The example config's data directory is the one the unit lets the broker write.
    let conf = check_keel_toml(
        "deploy/systemd/keel.toml",
        &read("deploy/systemd/keel.toml"),
    );
    let data_dir = conf
        .get("data_dir")
        .and_then(|v| v.as_str())
        .expect("keel.toml sets data_dir");
    let writable: Vec<&str> = svc
        .get("ReadWritePaths")
        .expect("ReadWritePaths")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert!(
        writable.contains(&data_dir),
        "ReadWritePaths {writable:?} must include data_dir {data_dir}"
    );
}

// ---------------------------------------------------------------------------------------------
// Container images

#[test]
fn both_image_builds_make_the_same_runtime_image() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let script = read("deploy/build-image.sh");
    // The runtime stage of the Dockerfile: everything after the last FROM.
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").expect("a FROM")..];
    assert!(
        runtime.starts_with("\nFROM scratch"),
        "the runtime image is FROM scratch"
    );
    assert!(
        dockerfile.contains("target-feature=+crt-static")
            && dockerfile.contains("--target x86_64-unknown-linux-gnu"),
        "the Dockerfile builds a static binary for an explicit target"
    );
    assert!(
        script.contains("target-feature=+crt-static") && script.contains("FROM scratch"),
        "build-image.sh builds a static binary into a FROM scratch image"
    );
    assert!(
        script.contains("set -euo pipefail"),
        "build-image.sh stops on errors"
    );
    // build-image.sh writes its Dockerfile with $uid for the user; compare the other lines.
    let uid_line = format!("uid={IMAGE_UID}");
    assert!(
        script.contains(&uid_line),
        "build-image.sh runs as {IMAGE_UID}"
    );
    for line in [
        format!("USER {IMAGE_UID}:{IMAGE_UID}"),
        "VOLUME [\"/data\"]".to_owned(),
        format!("EXPOSE {GRPC_PORT} {METRICS_PORT}"),
        "ENTRYPOINT [\"/keel\"]".to_owned(),
    ] {
        assert!(runtime.contains(&line), "Dockerfile runtime stage: {line}");
        let in_script = line.replace(&IMAGE_UID.to_string(), "$uid");
        assert!(script.contains(&in_script), "build-image.sh: {in_script}");
    }
    let cmd = |text: &str| -> String {
        text.lines()
            .find(|l| l.starts_with("CMD "))
            .expect("a CMD")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect()
    };
    assert_eq!(
        cmd(runtime),
        cmd(&script),
        "both images run the same default command"
    );
    assert!(
        cmd(runtime).contains("\"--data-dir\",\"/data\""),
        "data in the volume"
    );
}

// ---------------------------------------------------------------------------------------------
// Docker compose and the Grafana dashboard.

#[test]
fn compose_file_publishes_each_broker_and_separates_peer_and_client_addresses() {
    let docs = YamlLoader::load_from_str(&read("deploy/docker-compose.yml")).expect("compose YAML");
    let doc = &docs[0];
    let vars = accepted_env_vars();
    let services = doc["services"].as_hash().expect("services");
    assert_eq!(services.len(), 3, "three brokers");
    let mut grpc_ports = BTreeSet::new();
    for id in 1..=3u32 {
        let name = format!("keel-{id}");
        let svc = &doc["services"][name.as_str()];
        assert_eq!(
            s(&svc["image"], "image"),
            "${KEEL_IMAGE:-keel:local}",
            "{name}: the image the build script tags"
        );
        let env = svc["environment"].as_hash().expect("environment");
        for (k, _) in env {
            let k = k.as_str().expect("env key");
            assert!(vars.contains(k), "{name}: keel broker does not read {k}");
        }
        assert_eq!(s(&svc["environment"]["KEEL_ID"], "KEEL_ID"), id.to_string());
        let cluster = check_initial_cluster(
            &name,
            s(
                &svc["environment"]["KEEL_INITIAL_CLUSTER"],
                "initial cluster",
            ),
        );
        assert_eq!(
            cluster.get(&id).map(String::as_str),
            Some(format!("keel-{id}:9292").as_str()),
            "{name}: peers reach it by its service name"
        );
        let advertise = s(&svc["environment"]["KEEL_ADVERTISE"], "advertise");
        let port = 9291 + id;
        assert!(
            advertise.ends_with(&format!(":{port}")),
            "{name}: clients are told the published port: {advertise}"
        );
        let ports: Vec<&str> = list(&svc["ports"], "ports")
            .iter()
            .map(|p| s(p, "port"))
            .collect();
        assert!(
            ports.contains(&format!("127.0.0.1:{port}:9292").as_str()),
            "{ports:?}"
        );
        assert!(
            ports.contains(&format!("127.0.0.1:{}:9392", port + 100).as_str()),
            "{ports:?}"
        );
        grpc_ports.insert(port);
        let test: Vec<&str> = list(&svc["healthcheck"]["test"], "healthcheck")
            .iter()
            .map(|t| s(t, "healthcheck"))
            .collect();
        assert_eq!(test, ["CMD", "/keel", "probe", "127.0.0.1:9392"]);
        let volume = s(&list(&svc["volumes"], "volumes")[0], "volume");
        let (vol, mount) = volume.split_once(':').expect("named volume");
        assert_eq!(mount, "/data");
        assert!(
            !doc["volumes"][vol].is_badvalue(),
            "{name}: volume {vol} is declared"
        );
        assert_eq!(s(&list(&svc["networks"], "networks")[0], "network"), "keel");
    }
    assert_eq!(grpc_ports.len(), 3);
    assert!(!doc["networks"]["keel"].is_badvalue());
}

#[test]
fn dashboard_queries_only_metrics_the_broker_exports() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/keel-dashboard.json")).expect("dashboard JSON");
    let mut sources = String::new();
    for dir in ["crates/keel-broker/src", "crates/keel-raft/src"] {
        let mut stack = vec![repo().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)
                .expect("read dir")
                .filter_map(Result::ok)
            {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    sources.push_str(&std::fs::read_to_string(&p).expect("read source"));
                }
            }
        }
    }
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut seen = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("keel_") {
                    continue;
                }
                // A histogram's series carry suffixes its name in the source does not.
                let name = if sources.contains(&format!("\"{word}\"")) {
                    word
                } else {
                    word.trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count")
                };
                seen.insert(name.to_owned());
            }
        }
    }
    for m in &seen {
        assert!(
            sources.contains(&format!("\"{m}\"")),
            "the dashboard queries {m}, which the broker does not export"
        );
    }
    for needed in [
        "keel_under_replicated_partitions",
        "keel_partition_is_leader",
        "keel_raft_commit_seconds",
        "keel_log_flush_seconds",
        "keel_consumer_group_lag_sum",
        "keel_partition_size_bytes",
        "keel_request_duration_seconds",
    ] {
        assert!(seen.contains(needed), "the dashboard shows {needed}");
    }
}
