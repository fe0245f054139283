//! `switchyard cluster-local --nodes N --dir DIR`: N broker processes on this
//! machine forming one cluster, for trying clustering out. Node `nI` lives in
//! `DIR/nI` (its config.toml, data and log); each gets free ports on 127.0.0.1,
//! chosen on first start and kept in its config.toml, so a restart with the
//! same DIR brings back the same cluster. Ctrl-C (or SIGTERM) stops them all.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The ports of one node.
struct Ports {
    amqp: u16,
    mqtt: u16,
    stomp: u16,
    management: u16,
    cluster: u16,
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn node_config(dir: &Path, name: &str, ports: &Ports, seeds: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Written by `switchyard cluster-local`: node {name}.");
    let _ = writeln!(s, "data_dir = {:?}", dir.join("data").display().to_string());
    let _ = writeln!(s, "\n[listeners]");
    let _ = writeln!(s, "amqp = \"127.0.0.1:{}\"", ports.amqp);
    let _ = writeln!(s, "mqtt = \"127.0.0.1:{}\"", ports.mqtt);
    let _ = writeln!(s, "stomp = \"127.0.0.1:{}\"", ports.stomp);
    let _ = writeln!(s, "management = \"127.0.0.1:{}\"", ports.management);
    let _ = writeln!(s, "\n[cluster]");
    let _ = writeln!(s, "node = \"{name}\"");
    let _ = writeln!(s, "listen = \"127.0.0.1:{}\"", ports.cluster);
    let seeds: Vec<String> = seeds.iter().map(|x| format!("\"{x}\"")).collect();
    let _ = writeln!(s, "seeds = [{}]", seeds.join(", "));
    s
}

/// Writes the node configs that do not exist yet; returns their paths.
fn prepare(dir: &Path, nodes: usize) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    let configs: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.join(n).join("config.toml"))
        .collect();
    let existing = configs.iter().filter(|p| p.exists()).count();
    if existing == nodes {
        return Ok(names.into_iter().zip(configs).collect());
    }
    if existing > 0 {
        bail!(
            "{} holds {existing} of {nodes} node configs: use the same --nodes as before, or an empty --dir",
            dir.display()
        );
    }
    let mut ports = Vec::new();
    for _ in &names {
        ports.push(Ports {
            amqp: free_port()?,
            mqtt: free_port()?,
            stomp: free_port()?,
            management: free_port()?,
            cluster: free_port()?,
        });
    }
    let seeds: Vec<String> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| format!("{n}@127.0.0.1:{}", p.cluster))
        .collect();
    for ((name, path), p) in names.iter().zip(&configs).zip(&ports) {
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("cannot create {}", node_dir.display()))?;
        std::fs::write(path, node_config(&node_dir, name, p, &seeds))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(names.into_iter().zip(configs).collect())
}

fn read_ready(path: &Path) -> Option<Vec<(String, SocketAddr)>> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let obj = v.as_object()?;
    Some(
        obj.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.parse().ok()?)))
            .collect(),
    )
}

fn stop(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        // SIGTERM: each node closes its store and Raft cleanly.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    for (name, c) in children.iter_mut() {
        match c.wait() {
            Ok(s) => eprintln!("{name} exited: {s}"),
            Err(e) => eprintln!("{name}: {e}"),
        }
    }
}

pub fn run(nodes: usize, dir: &Path) -> anyhow::Result<()> {
    if !(1..=9).contains(&nodes) {
        bail!("--nodes must be 1..=9");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let nodes = prepare(&dir, nodes)?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut children = Vec::new();
    for (name, config) in &nodes {
        let node_dir = dir.join(name);
        let ready = node_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(node_dir.join("node.log"))?;
        let child = Command::new(&exe)
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        children.push((name.clone(), child));
    }
    // Wait for every node's ready file (each is written once all its listeners,
    // the cluster one included, are bound).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut table = Vec::new();
    for (name, _) in &nodes {
        let ready = dir.join(name).join("ready.json");
        loop {
            if let Some(addrs) = read_ready(&ready) {
                table.push((name.clone(), addrs));
                break;
            }
            let exited = children
                .iter_mut()
                .find_map(|(n, c)| c.try_wait().ok().flatten().map(|s| (n.clone(), s)));
            if let Some((n, status)) = exited {
                let log = dir.join(n.as_str()).join("node.log");
                stop(&mut children);
                bail!("{n} exited at start ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                stop(&mut children);
                bail!("{name} did not start within 30 s; see its node.log");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!(
        "switchyard cluster-local: {} nodes in {}",
        nodes.len(),
        dir.display()
    );
    for (name, addrs) in &table {
        let list: Vec<String> = addrs.iter().map(|(k, a)| format!("{k}={a}")).collect();
        println!("  {name}: {}", list.join(" "));
    }
    if let Some((_, addrs)) = table.first() {
        if let Some((_, a)) = addrs.iter().find(|(k, _)| k == "cluster") {
            println!("status: switchyard ctl cluster status --node {a}");
        }
    }
    println!("Ctrl-C stops every node.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    stop(&mut children);
    Ok(())
}
