//! Review findings, each as a test that fails on the code it describes.

use ftpgate::config::PortRange;
use ftpgate::pinhole::PortPool;
use std::net::{IpAddr, Ipv4Addr};

/// Once a pool's fresh ports are all leased, the next ports come from those
/// given back; they must still be drawn at random, not in the order they
/// were given back, which anyone who saw the returns could name.
#[test]
fn a_busy_pool_still_draws_ports_at_random() {
    let client: IpAddr = Ipv4Addr::new(192, 0, 2, 1).into();
    let trials = 10;
    let mut in_return_order = 0;
    for _ in 0..trials {
        let pool = PortPool::new(
            "review",
            PortRange {
                lo: 50000,
                hi: 50009,
            },
        );
        let mut held: Vec<_> = (0..10).map(|_| pool.lease(client).unwrap()).collect();
        // Five come back, front to back; none is fresh again yet (half the
        // pool cools).
        let returned: Vec<u16> = held.drain(..5).map(|l| l.port()).collect();
        let next: Vec<_> = (0..5).map(|_| pool.lease(client).unwrap()).collect();
        let next: Vec<u16> = next.iter().map(|l| l.port()).collect();
        let mut sorted = next.clone();
        sorted.sort_unstable();
        let mut want = returned.clone();
        want.sort_unstable();
        assert_eq!(sorted, want, "only the returned ports are free");
        if next == returned {
            in_return_order += 1;
        }
    }
    // At random, at most one order in 12 matches; ten in ten is no chance.
    assert!(
        in_return_order < trials,
        "{trials} times the next ports were the returned ones, in return order"
    );
}
