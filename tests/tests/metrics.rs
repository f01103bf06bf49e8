//! The metrics endpoint against the real agent: series that go with their port, and a server
//! that clients cannot knock over (idle floods under a 1024 open-file limit, exhausted file
//! descriptors, slow and oversized requests).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{
    Agent, PREFIX, VmLab, VmLabChecks as _, http_get,
    scrape::{find, metrics_addr, scrape},
    skip_unless_root,
};
use netlab::in_netns;

const WAIT: Duration = Duration::from_secs(30);
/// The server's own limits (`exposition::server::Limits::default`), plus slack.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CUT_OFF_WITHIN: Duration = Duration::from_secs(15);

/// User + system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u64) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[14 - 3].parse::<u64>()? + f[15 - 3].parse::<u64>()?)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn agent_pid(agent: &Agent) -> Result<u64> {
    agent.status()?["pid"].as_u64().context("no pid in status")
}

/// Lets this test process hold more sockets than its default soft limit.
fn raise_own_fd_limit(to: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0);
    lim.rlim_max = lim.rlim_max.max(to);
    lim.rlim_cur = lim.rlim_cur.max(to);
    // SAFETY: valid pointer; root may raise the hard limit.
    ensure!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0,
        "setrlimit: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `n` connections to `addr` from inside `ns`, sending nothing.
fn idle_connections(ns: &str, addr: &str, n: usize) -> Result<Vec<TcpStream>> {
    let addr = addr.to_owned();
    in_netns(ns, move || {
        (0..n)
            .map(|i| {
                TcpStream::connect(&addr).with_context(|| format!("idle connection {i} of {n}"))
            })
            .collect()
    })
}

/// Waits until the server has closed every connection in `conns` (each read sees EOF or a
/// reset); fails if one is still open after `within`.
fn wait_all_closed(conns: &mut [TcpStream], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    for (i, c) in conns.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "connection {i} still open after {within:?}"
        );
        c.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 512];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                // A response (e.g. 408) before the close: read on to the end.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    anyhow::bail!("connection {i} still open after {within:?}")
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// Sends `request` from inside `ns` and reads until the server closes: (response, how long).
fn exchange(ns: &str, addr: &str, request: Vec<u8>) -> Result<(String, Duration)> {
    let addr = addr.to_owned();
    in_netns(ns, move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(CUT_OFF_WITHIN))?;
        // A server that cuts an oversized request short may reset before all of it is written.
        let _ = s.write_all(&request);
        let mut resp = Vec::new();
        match s.read_to_end(&mut resp) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::bail!("the server kept the connection open for {CUT_OFF_WITHIN:?}")
            }
            Err(_) => {}
        }
        Ok((
            String::from_utf8_lossy(&resp).into_owned(),
            started.elapsed(),
        ))
    })
}

/// A scrape that succeeds within `within`, retried at once when refused or cut (the server
/// sheds connections under pressure; the next one must get through).
fn scrape_eventually(ns: &str, addr: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        match http_get(ns, addr, "/metrics") {
            Ok(body) if body.contains("bridge_guard_build_info") => return Ok(body),
            Ok(body) => anyhow::bail!("a scrape without build info: {body}"),
            Err(e) if Instant::now() < deadline => eprintln!("scrape failed, again: {e:#}"),
            Err(e) => return Err(e.context(format!("no scrape succeeded within {within:?}"))),
        }
    }
}

/// Detaches vnet0 and waits for the agent to put it back.
fn repair_still_happens(lab: &VmLab) -> Result<()> {
    lab.host.ip("link set vnet0 nomaster")?;
    lab.wait_healthy(WAIT)
        .context("the agent did not repair a detached tap")
}

#[test]
fn a_deleted_taps_series_leave_metrics_within_a_second() -> Result<()> {
    if skip_unless_root("a_deleted_taps_series_leave_metrics_within_a_second") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "forget", 2)?;
    let agent = Agent::run(&lab.host, &["--bridge", "br0", "--metrics", "127.0.0.1:0"])?;
    lab.wait_healthy(WAIT)?;
    let ns = &lab.host.name;
    let s = scrape(ns, &agent)?;
    for port in ["vnet0", "vnet1"] {
        ensure!(
            find(&s, "bridge_guard_port_outages_total", &[("port", port)]).is_some(),
            "{port} is not on /metrics"
        );
    }
    let build = find(&s, "bridge_guard_build_info", &[]).context("no build info")?;
    ensure!(
        build.labels.get("version") == Some(env!("CARGO_PKG_VERSION")),
        "build info: {:?}",
        build.labels
    );
    for label in ["revision", "ebpf"] {
        ensure!(
            build.labels.get(label).is_some(),
            "no {label}: {:?}",
            build.labels
        );
    }

    lab.host.ip("link del vnet1")?;
    let deleted = Instant::now();
    let addr = metrics_addr(&agent)?;
    // Scrape after scrape, each waiting on the server, until vnet1 is gone or a second passed.
    loop {
        let body = http_get(ns, &addr, "/metrics")?;
        if !body.contains("\"vnet1\"") {
            break;
        }
        ensure!(
            deleted.elapsed() < Duration::from_secs(1),
            "vnet1's series are still on /metrics a second after it was deleted:\n{}",
            body.lines()
                .filter(|l| l.contains("vnet1"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!(
        "vnet1's series left /metrics {:?} after it was deleted",
        deleted.elapsed()
    );
    let s = scrape(ns, &agent)?;
    ensure!(
        find(&s, "bridge_guard_port_outages_total", &[("port", "vnet0")]).is_some(),
        "vnet0 went too"
    );
    Ok(())
}

#[test]
fn idle_connections_under_a_1024_file_limit_cost_no_cpu_and_block_nothing() -> Result<()> {
    if skip_unless_root("idle_connections_under_a_1024_file_limit_cost_no_cpu_and_block_nothing") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "fdflood", 1)?;
    // systemd's default limit: the agent gets no more than 1024 open files.
    let agent = Agent::run_with(
        &lab.host,
        &["prlimit", "--nofile=1024:1024", "--"],
        &["--bridge", "br0", "--metrics", "127.0.0.1:0"],
        &[],
    )?;
    lab.wait_healthy(WAIT)?;
    let pid = agent_pid(&agent)?;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    ensure!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("1024")),
        "the agent's open-file limit is not 1024:\n{limits}"
    );
    raise_own_fd_limit(4096)?;
    let addr = metrics_addr(&agent)?;
    let ns = &lab.host.name;

    let cpu_before = cpu_ticks(pid)?;
    let started = Instant::now();
    let mut idle = idle_connections(ns, &addr, 1500)?;
    scrape_eventually(ns, &addr, WAIT)?;
    repair_still_happens(&lab)?;
    // The window ends when the server has let every idle connection go (the newest after the
    // header timeout): long enough that a spinning accept loop would show.
    wait_all_closed(&mut idle, HEADER_TIMEOUT + CUT_OFF_WITHIN)?;
    let wall = started.elapsed();
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second();
    eprintln!(
        "1500 idle connections: agent CPU {cpu:.2} s over {:.2} s",
        wall.as_secs_f64()
    );
    ensure!(
        cpu < 0.25 * wall.as_secs_f64(),
        "the agent spent {cpu:.2} s of CPU in {wall:?} with idle connections open"
    );
    ensure!(
        wall >= HEADER_TIMEOUT,
        "the idle connections were closed after {wall:?}, before the header timeout"
    );
    scrape_eventually(ns, &addr, WAIT)?;
    Ok(())
}

#[test]
fn out_of_file_descriptors_the_server_pauses_sheds_and_recovers() -> Result<()> {
    if skip_unless_root("out_of_file_descriptors_the_server_pauses_sheds_and_recovers") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "emfile", 1)?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0", "--metrics", "127.0.0.1:0"])?;
    lab.wait_healthy(WAIT)?;
    let pid = agent_pid(&agent)?;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    // Room for two connections: every accept after that fails with EMFILE.
    let soft = open + 2;
    netlab::run(std::process::Command::new("prlimit").args([
        "--pid",
        &pid.to_string(),
        // Soft limit only: raising the hard one needs CAP_SYS_RESOURCE.
        &format!("--nofile={soft}:"),
    ]))?;
    let addr = metrics_addr(&agent)?;
    let ns = &lab.host.name;

    let cpu_before = cpu_ticks(pid)?;
    let started = Instant::now();
    let mut idle = idle_connections(ns, &addr, 100)?;
    agent.wait_log("the accept pause", WAIT, |l| {
        l.contains("cannot accept connections")
    })?;
    scrape_eventually(ns, &addr, WAIT)?;
    wait_all_closed(&mut idle, WAIT)?;
    let wall = started.elapsed();
    let cpu = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second();
    eprintln!(
        "out of descriptors: agent CPU {cpu:.2} s over {:.2} s",
        wall.as_secs_f64()
    );
    ensure!(
        cpu < 0.25 * wall.as_secs_f64(),
        "EMFILE made the agent spend {cpu:.2} s of CPU in {wall:?}"
    );
    repair_still_happens(&lab)?;
    Ok(())
}

#[test]
fn slow_and_oversized_requests_are_cut_off_and_routes_answer() -> Result<()> {
    if skip_unless_root("slow_and_oversized_requests_are_cut_off_and_routes_answer") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "slowloris", 0)?;
    let agent = Agent::run(&lab.host, &["--bridge", "br0", "--metrics", "127.0.0.1:0"])?;
    let addr = metrics_addr(&agent)?;
    let ns = &lab.host.name;

    // Headers that never end.
    let (resp, took) = exchange(
        ns,
        &addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n".to_vec(),
    )?;
    ensure!(!resp.starts_with("HTTP/1.1 200"), "answered: {resp}");
    eprintln!("an unfinished request was cut off after {took:?}");

    // 64 KiB of header.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let (resp, _) = exchange(ns, &addr, big)?;
    ensure!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
        "an oversized request got: {}",
        resp.lines().next().unwrap_or("")
    );

    // The routes.
    let head = |method: &str, path: &str| -> Result<String> {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        Ok(exchange(ns, &addr, req.into_bytes())?.0)
    };
    let r = head("HEAD", "/metrics")?;
    ensure!(r.starts_with("HTTP/1.1 200"), "HEAD: {r}");
    let (hdr, body) = r.split_once("\r\n\r\n").context("no header end")?;
    ensure!(body.is_empty(), "HEAD sent a body: {body:.80}");
    ensure!(
        hdr.to_ascii_lowercase().contains("content-length: "),
        "HEAD has no length: {hdr}"
    );
    let r = head("GET", "/")?;
    ensure!(
        r.starts_with("HTTP/1.1 200") && r.contains("href=\"/metrics\""),
        "landing page: {r}"
    );
    ensure!(head("GET", "/nothing")?.starts_with("HTTP/1.1 404"));
    ensure!(head("POST", "/metrics")?.starts_with("HTTP/1.1 405"));
    // Still serving after all that.
    scrape_eventually(ns, &addr, WAIT)?;
    Ok(())
}
