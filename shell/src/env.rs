//! The environment contract: what a service's process, its build and its hooks
//! find in their environment.
//!
//! One type builds it for all three, so they agree:
//!
//! | variable | value | process | hooks | build |
//! |---|---|---|---|---|
//! | `[env]` of `service.toml` | as written | ✓ | ✓ | ✓ |
//! | `PORT` | the internal port of the service's *first* port (manifest order): listen on `127.0.0.1:$PORT` | ✓ | ✓ | |
//! | `MOLT_PORT_<NAME>` | the internal port of each named port (name upper-cased) | ✓ | ✓ | |
//! | `MOLT_SERVICE` | the service's name | ✓ | ✓ | ✓ |
//! | `MOLT_COMMIT` | the commit it runs (full hex) | ✓ | ✓ | ✓ |
//! | `MOLT_INSTANCE` | the instance's name | ✓ | ✓ | ✓ |
//! | `MOLT_DATA` | its data directory, if it declares `data` | ✓ | ✓ | |
//!
//! `[env]` cannot set `PORT` or `MOLT_*` (`service.toml` is refused). A hook of a
//! new process gets that process's ports; a plugin's hooks get its host's.

use std::collections::BTreeMap;
use std::path::Path;

use image_spec::{CommitId, InstanceName, ServiceManifest, ServiceName};

/// Everything the environment is made of (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ServiceEnv<'a> {
    /// The instance.
    pub instance: &'a InstanceName,
    /// The service.
    pub service: &'a ServiceName,
    /// The commit.
    pub commit: CommitId,
    /// Its manifest (`[env]`, and the order of its ports).
    pub manifest: &'a ServiceManifest,
    /// The internal port of each named port; `None` for a build, which listens
    /// on nothing.
    pub ports: Option<&'a BTreeMap<String, u16>>,
    /// Its data directory, if it has one (not given to builds).
    pub data: Option<&'a Path>,
}

/// The variable that carries the internal port of the port named `name`.
pub fn port_var(name: &str) -> String {
    format!("MOLT_PORT_{}", name.to_ascii_uppercase())
}

impl ServiceEnv<'_> {
    /// The variables.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .manifest
            .env()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(ports) = self.ports {
            if let Some(port) = self.primary_port() {
                env.push(("PORT".into(), port.to_string()));
            }
            for spec in self.manifest.ports() {
                if let Some(port) = ports.get(&spec.name) {
                    env.push((port_var(&spec.name), port.to_string()));
                }
            }
        }
        env.push(("MOLT_SERVICE".into(), self.service.to_string()));
        env.push(("MOLT_COMMIT".into(), self.commit.to_string()));
        env.push(("MOLT_INSTANCE".into(), self.instance.to_string()));
        if let Some(data) = self.data {
            env.push(("MOLT_DATA".into(), data.display().to_string()));
        }
        env
    }

    /// `$PORT`: the internal port of the first port in manifest order.
    pub fn primary_port(&self) -> Option<u16> {
        let first = self.manifest.ports().first()?;
        self.ports?.get(&first.name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ServiceManifest {
        ServiceManifest::parse(
            "name = \"web\"\n[run]\ncommand = [\"./run\"]\n\
             [[ports]]\nname = \"public\"\nport = 8080\n\
             [[ports]]\nname = \"admin_api\"\nport = 9090\n\
             [env]\nGREETING = \"hi\"\n",
        )
        .unwrap()
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn port_is_the_first_port_in_manifest_order_for_process_and_hooks_alike() {
        let m = manifest();
        let instance = InstanceName::new("dev-1").unwrap();
        let service = ServiceName::new("web").unwrap();
        // Alphabetically `admin_api` comes first; the manifest lists `public` first.
        let ports = BTreeMap::from([
            ("admin_api".to_owned(), 41000),
            ("public".to_owned(), 42000),
        ]);
        let data = Path::new("/srv/data/web");
        let env = ServiceEnv {
            instance: &instance,
            service: &service,
            commit: CommitId::from_bytes([7; 32]),
            manifest: &m,
            ports: Some(&ports),
            data: Some(data),
        };
        let vars = env.vars();
        assert_eq!(get(&vars, "PORT"), Some("42000"));
        assert_eq!(get(&vars, "MOLT_PORT_PUBLIC"), Some("42000"));
        assert_eq!(get(&vars, "MOLT_PORT_ADMIN_API"), Some("41000"));
        assert_eq!(get(&vars, "GREETING"), Some("hi"));
        assert_eq!(get(&vars, "MOLT_SERVICE"), Some("web"));
        let mut names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), vars.len(), "each variable once: {vars:?}");
        assert_eq!(get(&vars, "MOLT_DATA"), Some("/srv/data/web"));
        assert_eq!(get(&vars, "MOLT_INSTANCE"), Some("dev-1"));

        // A build listens on nothing and touches no data.
        let build = ServiceEnv {
            ports: None,
            data: None,
            ..env
        }
        .vars();
        assert_eq!(get(&build, "PORT"), None);
        assert_eq!(get(&build, "MOLT_DATA"), None);
        assert_eq!(get(&build, "MOLT_COMMIT"), Some(&*"07".repeat(32)));
    }
}
