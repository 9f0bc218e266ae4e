// Scratch experiment (not committed).
use std::time::Instant;
use zy_packer::*;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let n1 = std::env::args().nth(2).map(|s| s == "1").unwrap_or(true);
    let mut c: Cluster<u64> = Cluster::new(Policy {
        n_plus_one: n1,
        ..Policy::default()
    });
    let models = [(32u64, 131072u64), (64, 262144), (48, 393216)];
    let mut cap = [0u64; 2];
    for i in 0..n {
        let (cpu, mem) = models[i % 3];
        cap[0] += cpu * 4000;
        cap[1] += mem;
        c.add_node(NodeSpec {
            name: format!("n{i}"),
            zone: if i % 2 == 0 { "a".into() } else { "b".into() },
            rack: Some(format!("r{}", i / 20)),
            capacity: Res::new(cpu * 1000, mem, 4000),
            state: NodeState::Ready,
            overcommit: None,
        })
        .unwrap();
    }
    let sizes = [
        (1u64, 1024u64),
        (2, 4096),
        (4, 8192),
        (8, 16384),
        (16, 65536),
        (2, 2048),
        (4, 16384),
    ];
    let mut s = 12345u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut used_mem = 0u64;
    let mut times = Vec::new();
    let mut rej = 0;
    let mut k = 0u64;
    while used_mem < cap[1] * 80 / 100 {
        let (cpu, mem) = sizes[(rnd() % 7) as usize];
        let g = if rnd() % 3 == 0 {
            Some(format!("g{}", k / 2))
        } else {
            None
        };
        let r = Request {
            zone: if rnd() % 2 == 0 {
                "a".into()
            } else {
                "b".into()
            },
            demand: Res::new(cpu * 1000, mem, 50),
            group: g,
            spread: Spread::Host,
            priority: 0,
        };
        let t = Instant::now();
        let ok = c.place(k, &r).is_ok();
        times.push(t.elapsed().as_micros() as u64);
        if ok {
            used_mem += mem;
        } else {
            rej += 1;
            if rej > 200 {
                break;
            }
        }
        k += 1;
    }
    times.sort();
    let used = (0..c.node_count()).filter(|&i| c.vm_count(i) > 0).count();
    println!(
        "n={n} decisions={} rejected={rej} used={used} p50={}us p99={}us max={}us",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times.last().unwrap()
    );
}
