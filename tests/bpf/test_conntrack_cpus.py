"""A flow's packets may reach the balancer on any CPU: with RSS each queue hashes
flows to CPUs, but a veth, a single-queue NIC or a host without RSS affinity runs
XDP on whichever CPU the sender's softirq ran. Whatever CPU a packet arrives on, it
must find its flow's one entry: a flow never changes backend because its packets
changed CPU, also after its VIP's table changed (so the table would choose another)."""
from __future__ import annotations

import os

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from meshlb.dataplane import layouts as L
from meshlb.dataplane.libbpf import XDP_REDIRECT, XDP_TX

from .harness import RING, setup_vip, snat_port_of
from .pkt import MAC_BE_REDIR, MAC_BE_TX, key_of

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def cpus():
    have = sorted(os.sched_getaffinity(0))
    assert len(have) >= 2, "these tests run packets on two CPUs; this host offers one"
    return have[0], have[1]


def _backend(r) -> str:
    return {MAC_BE_TX: "tx", MAC_BE_REDIR: "redir"}[Ether(r.data).dst]


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_flows_keep_their_backend_on_every_cpu_after_a_table_change(lb, cpus, fam):
    a, b = cpus
    f = setup_vip(lb, fam, "dr", table_backend=1)
    flows = [f["tcp"](flags="S", sport=41000 + i, seq=7000 + i, payload=b"") for i in range(32)]
    # half the flows start on one CPU, half on the other
    for i, syn in enumerate(flows):
        assert lb.run(syn, cpu=(a, b)[i % 2]).retval == XDP_TX
    lb.lb.set_vip_table(5, [2] * RING)  # new flows go to the other backend now
    for i, syn in enumerate(flows):
        for cpu in (b, a) if i % 2 == 0 else (a, b):
            ack = f["tcp"](flags="A", sport=syn[TCP].sport, seq=syn[TCP].seq + 1)
            r = lb.run(ack, cpu=cpu)
            assert r.retval == XDP_TX and _backend(r) == "tx", (i, cpu)
            # the SYN retransmitted, on either CPU, is still the same connection
            r = lb.run(syn, cpu=cpu)
            assert r.retval == XDP_TX and _backend(r) == "tx", (i, cpu)
    assert lb.lb.conntrack_count() == len(flows)
    # a new connection on a tuple, set up on one CPU, is what the other CPU sees next
    syn = f["tcp"](flags="S", sport=41000, seq=99000, payload=b"")
    assert lb.run(syn, cpu=b).retval == XDP_REDIRECT
    r = lb.run(f["tcp"](flags="A", sport=41000, seq=99001), cpu=a)
    assert r.retval == XDP_REDIRECT and _backend(r) == "redir"
    assert lb.lb.conntrack_lookup(key_of(syn)).backend_id == 2


def test_nat_flow_keeps_its_snat_port_and_reply_on_every_cpu(lb, cpus):
    a, b = cpus
    f = setup_vip(lb, "v4", "nat", table_backend=1, nat_port=8080)
    syn = f["tcp"](flags="S", seq=5000, payload=b"")
    assert lb.run(syn, cpu=a).retval == XDP_TX
    sp = snat_port_of(lb, syn)
    lb.lb.set_vip_table(5, [2] * RING)
    r = lb.run(f["tcp"](flags="A", seq=5001), cpu=b)
    out = Ether(r.data)
    assert r.retval == XDP_TX and out[TCP].sport == sp and out["IP"].dst == f["tx"]
    # the backend's reply, whichever CPU takes it, goes back to the client
    rep = (Ether(src=MAC_BE_TX, dst=Ether(bytes(syn)).dst) / out["IP"].__class__(
        src=f["tx"], dst=f["snat"]) / TCP(sport=8080, dport=sp, flags="A"))
    for cpu in (a, b):
        before = lb.counters()
        r = lb.run(rep, cpu=cpu)
        assert r.retval == XDP_TX and Ether(r.data)[TCP].dport == 40000
        assert lb.delta(before)["nat_reply"] == 1
    assert len(lb.lb.nat_entries()) == 1 and lb.lb.conntrack_lookup(key_of(syn)).flags & L.MLB_CT_F_NAT
