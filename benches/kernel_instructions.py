#!/usr/bin/env python3
"""Instructions per multiply-accumulate in the inner loop of each aarch64 INT8 GEMM kernel, on paper.

Reads the machine code that ships: the `_native` extension inside the aarch64 wheel (default: the newest
dist/edgelearn-*_aarch64.whl, as made by scripts/build-wheels.sh), disassembled with
`aarch64-linux-gnu-objdump` (Debian binutils-aarch64-linux-gnu, pulled in by gcc-aarch64-linux-gnu).

How: every innermost loop of the binary (a backward branch with no other backward branch inside its body)
is found; a loop holding `smmla` is the i8mm kernel's, one holding `sdot` the dotprod kernel's, one holding
`smull`/`smull2` + `sadalp` the NEON kernel's (the busiest such loop if there are several). The
multiply-accumulates one iteration performs follow from the instructions' semantics:

    smull{,2} Vd.8h, Vn.8b/16b      8 products (NEON kernel; `sadalp` then only accumulates them)
    sdot      Vd.4s, Vn.16b, ...   16 products (4 lanes x 4)
    smmla     Vd.4s, Vn.16b, Vm.16b 32 products (2x2 block, 8 deep)

and are checked against the tile shape in the kernels' sources (MR x NR x KU per k-group, from
rust/edgelearn-core/src/gemm/aarch64/*.rs). "Expected speedup vs NEON" is the ratio of instructions per
MAC, i.e. what an in-order core issuing a fixed number of instructions per cycle would see; the last
column compares only the SIMD multiply instructions (the vector-pipe bound on wide cores).

Dynamic counting with a qemu plugin is not possible with Debian 12's qemu: qemu-user-static is built
without plugin support (`-plugin` is an unknown option) and no instruction-count plugin (libinsn.so) is
packaged, so this script counts statically; the loop bodies are straight-line code, so each iteration
executes exactly the instructions listed.

    python benches/kernel_instructions.py [--wheel W.whl | --so _native.abi3.so] [--show-loops] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SRC = os.path.join(ROOT, "rust", "edgelearn-core", "src", "gemm", "aarch64")
OBJDUMP = "aarch64-linux-gnu-objdump"

BRANCHES = {"b", "cbz", "cbnz", "tbz", "tbnz"}  # plus every b.<cond>
# products (multiply-accumulates) per instruction, keyed by mnemonic
PRODUCTS = {"smull": 8, "smull2": 8, "sdot": 16, "smmla": 32}
SIMD_MAC_OPS = {"smull", "smull2", "sadalp", "sdot", "smmla"}
KERNELS = ["neon", "dotprod", "i8mm"]
SIGNATURE = {"i8mm": "smmla", "dotprod": "sdot", "neon": "sadalp"}


@dataclass
class Insn:
    addr: int
    op: str
    args: str


@dataclass
class Loop:
    start: int
    end: int
    body: list = field(default_factory=list)

    def count(self, ops):
        return sum(1 for i in self.body if i.op in ops)

    @property
    def products(self):
        return sum(PRODUCTS.get(i.op, 0) for i in self.body)


def disassemble(path: str) -> list[Insn]:
    if shutil.which(OBJDUMP) is None:
        sys.exit(f"{OBJDUMP} not found: apt-get install binutils-aarch64-linux-gnu "
                 "(or run scripts/build-wheels.sh, which installs the cross toolchain)")
    out = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    insns = []
    line_re = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
    for line in out.splitlines():
        m = line_re.match(line)
        if m:
            args = m.group(3).split("//")[0].strip()
            insns.append(Insn(int(m.group(1), 16), m.group(2), args))
    return insns


def branch_target(i: Insn) -> int | None:
    if not (i.op in BRANCHES or i.op.startswith("b.")):
        return None
    m = re.search(r"(?:^|,\s*)([0-9a-f]+)\s+<", i.args)
    return int(m.group(1), 16) if m else None


def innermost_loops(insns: list[Insn]) -> list[Loop]:
    index = {i.addr: n for n, i in enumerate(insns)}
    back = []  # (start index, end index) of every backward branch
    for n, i in enumerate(insns):
        t = branch_target(i)
        if t is not None and t <= i.addr and t in index:
            back.append((index[t], n))
    loops = []
    for s, e in back:
        nested = any(s <= s2 and e2 < e for s2, e2 in back if (s2, e2) != (s, e))
        if not nested:
            loops.append(Loop(insns[s].addr, insns[e].addr, insns[s:e + 1]))
    return loops


def tile_shapes() -> dict[str, tuple[int, int, int]]:
    shapes = {}
    for name in KERNELS:
        path = os.path.join(KERNEL_SRC, f"{name}.rs")
        try:
            src = open(path, encoding="utf-8").read()
        except OSError:
            continue
        vals = {}
        for c in ("MR", "NR", "KU"):
            m = re.search(rf"const {c}: usize = (\d+);", src)
            if m:
                vals[c] = int(m.group(1))
        if len(vals) == 3:
            shapes[name] = (vals["MR"], vals["NR"], vals["KU"])
    return shapes


def classify(loops: list[Loop]) -> dict[str, tuple[Loop, int]]:
    found: dict[str, list[Loop]] = {k: [] for k in KERNELS}
    for lp in loops:
        if lp.count({"smmla"}):
            found["i8mm"].append(lp)
        elif lp.count({"sdot"}):
            found["dotprod"].append(lp)
        elif lp.count({"sadalp"}) and lp.count({"smull", "smull2"}):
            found["neon"].append(lp)
    return {k: (max(v, key=lambda lp: lp.products), len(v)) for k, v in found.items() if v}


def find_so(args) -> tuple[str, str, tempfile.TemporaryDirectory | None]:
    if args.so:
        return args.so, args.so, None
    wheel = args.wheel
    if wheel is None:
        cands = sorted(glob.glob(os.path.join(ROOT, "dist", "edgelearn-*_aarch64.whl")), key=os.path.getmtime)
        if not cands:
            sys.exit("no aarch64 wheel in dist/: run scripts/build-wheels.sh (or pass --wheel / --so)")
        wheel = cands[-1]
    tmp = tempfile.TemporaryDirectory()
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.search(r"edgelearn/_native.*\.so$", n)]
        if not names:
            sys.exit(f"{wheel} holds no edgelearn/_native*.so")
        so = z.extract(names[0], tmp.name)
    return so, os.path.basename(wheel), tmp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--wheel", help="aarch64 wheel (default: newest dist/edgelearn-*_aarch64.whl)")
    g.add_argument("--so", help="an aarch64 _native*.so (or any aarch64 ELF with the kernels)")
    ap.add_argument("--show-loops", action="store_true", help="print each kernel's loop body")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)

    so, label, tmp = find_so(args)
    try:
        loops = innermost_loops(disassemble(so))
    finally:
        if tmp is not None:
            tmp.cleanup()
    kernels = classify(loops)
    shapes = tile_shapes()
    missing = [k for k in KERNELS if k not in kernels]
    if "neon" in missing:
        sys.exit(f"no NEON kernel loop found in {label}")

    rows = []
    for name in KERNELS:
        if name not in kernels:
            continue
        lp, ncand = kernels[name]
        macs = lp.products
        n = len(lp.body)
        simd = lp.count(SIMD_MAC_OPS)
        loads = sum(1 for i in lp.body if i.op.startswith("ld"))
        row = {
            "kernel": name,
            "tile": "x".join(map(str, shapes[name])) if name in shapes else "?",
            "macs_per_iter": macs,
            "insns_per_iter": n,
            "simd_mac_insns": simd,
            "loads": loads,
            "other": n - simd - loads,
            "insns_per_mac": n / macs,
            "loop": f"{lp.start:#x}-{lp.end:#x}",
            "candidate_loops": ncand,
        }
        if name in shapes:
            mr, nr, ku = shapes[name]
            per_group = mr * nr * ku
            row["kgroups_per_iter"] = macs // per_group if macs % per_group == 0 else macs / per_group
            if macs % per_group:
                print(f"warning: {name}: {macs} MACs per iteration is not a multiple of the source tile "
                      f"{mr}x{nr}x{ku} = {per_group}", file=sys.stderr)
        rows.append(row)
    base = next(r for r in rows if r["kernel"] == "neon")
    for r in rows:
        r["speedup_vs_neon"] = base["insns_per_mac"] / r["insns_per_mac"]
        r["simd_speedup_vs_neon"] = (base["simd_mac_insns"] / base["macs_per_iter"]) / (
            r["simd_mac_insns"] / r["macs_per_iter"])

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"aarch64 INT8 GEMM inner loops in {label} ({OBJDUMP} -d)\n")
    hdr = ("kernel", "tile MRxNRxKU", "MACs/iter", "insns/iter", "(MAC-op/load/other)", "insns/MAC",
           "speedup vs NEON", "SIMD-op speedup")
    table = [hdr]
    for r in rows:
        table.append((r["kernel"], r["tile"], str(r["macs_per_iter"]), str(r["insns_per_iter"]),
                      f"{r['simd_mac_insns']}/{r['loads']}/{r['other']}", f"{r['insns_per_mac']:.4f}",
                      f"{r['speedup_vs_neon']:.2f}x", f"{r['simd_speedup_vs_neon']:.2f}x"))
    widths = [max(len(row[c]) for row in table) for c in range(len(hdr))]
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("MAC-op: smull/smull2/sadalp (NEON), sdot, smmla; loads: ld*; other: pointer updates, loop counter, "
          "branch.")
    for r in rows:
        extra = f", {r['candidate_loops']} candidate loops (busiest shown)" if r["candidate_loops"] > 1 else ""
        print(f"{r['kernel']}: loop at {r['loop']}, {r.get('kgroups_per_iter', '?')} k-group(s) per "
              f"iteration{extra}")
    for k in missing:
        print(f"{k}: no loop found (kernel not compiled into this binary?)")
    if args.show_loops:
        for name in KERNELS:
            if name in kernels:
                print(f"\n--- {name} inner loop ---")
                for i in kernels[name][0].body:
                    print(f"  {i.addr:8x}:  {i.op:<8} {i.args}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
