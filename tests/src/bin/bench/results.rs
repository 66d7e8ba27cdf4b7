//! What the benchmarks share: percentiles, and the results file.

use std::process::Command;

use anyhow::Result;

/// The `p`th percentile (0–100) of `values`, nearest rank; NaN when there are none.
pub fn pct(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[idx.min(v.len() - 1)]
}

pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.into_iter().collect();
    pct(&v, 50.0)
}

/// The load average's three figures, for the method text (the machine is shared).
pub fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Append one result section to `bench/RESULTS.md`: a heading with `title` and the date,
/// the machine, `method` (what was measured, how), then `body` (tables, summary lines).
pub fn record(title: &str, method: &str, body: &str) -> Result<()> {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let machine = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let text =
        format!("\n### {title}, {date}\n\nMachine: {machine}, {cpus} CPUs. {method}\n\n{body}");
    std::fs::create_dir_all("bench")?;
    let path = "bench/RESULTS.md";
    let mut all = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmark results\n\nAppended by `cargo xtask bench …`; newest last.\n".into()
    });
    all.push_str(&text);
    std::fs::write(path, all)?;
    println!("xtask bench: recorded in {path}");
    Ok(())
}
