// Scratch experiment (not committed): hosts used against a lower bound, ours vs best fit.
use zy_packer::*;

struct BestFit;
impl Scorer for BestFit {
    fn name(&self) -> &str {
        "bf"
    }
    fn score(&self, c: &Candidate) -> f64 {
        let u = c.after();
        u[CPU] + u[MEM]
    }
}
struct Ours(Zhengyun);
impl Scorer for Ours {
    fn name(&self) -> &str {
        "z"
    }
    fn score(&self, c: &Candidate) -> f64 {
        self.0.score(c)
    }
}

fn lb(nodes: &[Res], demand: Res) -> usize {
    let mut best = 0;
    for d in 0..2 {
        let mut caps: Vec<u64> = nodes.iter().map(|r| r.0[d]).collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        let mut sum = 0;
        let mut k = 0;
        while sum < demand.0[d] && k < caps.len() {
            sum += caps[k];
            k += 1;
        }
        best = best.max(k);
    }
    best
}

fn main() {
    let mix = std::env::args().nth(1).unwrap_or("gov".into());
    let stranding: f64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = 1000usize;
    let models = [(32u64, 131072u64), (64, 262144), (48, 393216)];
    let mut caps = Vec::new();
    for i in 0..n {
        let (c, m) = models[i % 3];
        caps.push(Res::new(c * 4000, m, 4000));
    }
    let total: Res = caps.iter().fold(Res::ZERO, |a, b| a.plus(b));
    let mut s = 99u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut reqs = Vec::new();
    let mut dem = Res::ZERO;
    let sizes: Vec<(u64, u64)> = match mix.as_str() {
        "gov" => vec![
            (1, 1024),
            (2, 4096),
            (4, 8192),
            (8, 16384),
            (16, 65536),
            (2, 2048),
            (4, 16384),
            (8, 32768),
        ],
        _ => vec![(16, 8192), (32, 16384), (2, 65536), (4, 131072)],
    };
    let mut k = 0u64;
    if mix == "advw" {
        // A witness: every node filled with a mix, so the fleet can hold all of it.
        let mut cpu_h = Vec::new();
        let mut mem_h = Vec::new();
        for cap in &caps {
            let (mut uc, mut um) = (0u64, 0u64);
            loop {
                let (c, m) = if um < cap.0[MEM] * 55 / 100 {
                    [(2u64, 32768u64), (4, 65536)][(rnd() % 2) as usize]
                } else {
                    [(16u64, 4096u64), (32, 8192)][(rnd() % 2) as usize]
                };
                if uc + c * 1000 > cap.0[CPU] * 85 / 100 || um + m > cap.0[MEM] * 85 / 100 {
                    break;
                }
                uc += c * 1000;
                um += m;
                let r = Request {
                    zone: "a".into(),
                    demand: Res::new(c * 1000, m, 20),
                    group: None,
                    spread: Spread::Host,
                    priority: 0,
                };
                dem = dem.plus(&r.demand);
                if c >= 16 {
                    cpu_h.push(r)
                } else {
                    mem_h.push(r)
                }
            }
        }
        // Alternating blocks of 500.
        let (mut a, mut b) = (cpu_h.into_iter(), mem_h.into_iter());
        loop {
            let x: Vec<Request> = a.by_ref().take(500).collect();
            let y: Vec<Request> = b.by_ref().take(500).collect();
            if x.is_empty() && y.is_empty() {
                break;
            }
            reqs.extend(x);
            reqs.extend(y);
        }
    }
    while mix != "advw"
        && dem.0[MEM] < total.0[MEM] * 85 / 100
        && dem.0[CPU] < total.0[CPU] * 85 / 100
    {
        let (c, m) = if mix == "adv" {
            sizes[((k / 500) % 2 * 2 + rnd() % 2) as usize]
        } else {
            sizes[(rnd() % sizes.len() as u64) as usize]
        };
        let g = if rnd() % 3 == 0 {
            Some(format!("g{}", k / 2))
        } else {
            None
        };
        let r = Request {
            zone: "a".into(),
            demand: Res::new(c * 1000, m, 20),
            group: g,
            spread: Spread::Host,
            priority: 0,
        };
        dem = dem.plus(&r.demand);
        reqs.push(r);
        k += 1;
    }
    let lbv = lb(&caps, dem);
    for (name, sc, order) in [
        ("bfd", &BestFit as &dyn Scorer, true),
        (
            "ours-static",
            &Ours(Zhengyun {
                stranding,
                ..Zhengyun::default()
            }) as &dyn Scorer,
            true,
        ),
        ("bf-online", &BestFit, false),
        (
            "ours-online",
            &Ours(Zhengyun {
                stranding,
                ..Zhengyun::default()
            }),
            false,
        ),
    ] {
        let mut c: Cluster<u64> = Cluster::new(Policy::default());
        for (i, cap) in caps.iter().enumerate() {
            c.add_node(NodeSpec {
                name: format!("n{i}"),
                zone: "a".into(),
                rack: None,
                capacity: Res::new(cap.0[0] / 4, cap.0[1], cap.0[2]),
                state: NodeState::Ready,
                overcommit: None,
            })
            .unwrap();
        }
        let idx: Vec<usize> = if order {
            static_order(&reqs, &Res::new(48000 * 4, 262144, 4000))
        } else {
            (0..reqs.len()).collect()
        };
        let mut rej = 0;
        for i in idx {
            if c.place_with(i as u64, &reqs[i], sc, Selection::All)
                .is_err()
            {
                rej += 1;
            }
        }
        let used = (0..n).filter(|&i| c.vm_count(i) > 0).count();
        println!(
            "{mix} {name}: lb={lbv} used={used} (+{:.1}%) rejected={rej} of {}",
            (used as f64 / lbv as f64 - 1.0) * 100.0,
            reqs.len()
        );
    }
}
