"""`--mode compile`: the real TPU compiler (libtpu, compile-only devices) on this CPU host.

A small U-ViT's train step is compiled for v5e slices; its memory, collectives and FLOPs are
checked against what the state, the mesh and `train/flops.py` say they must be.
"""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from runs import REPO, subprocess_env

from configs.fashion_mnist_uvit import get_config
from uvit_jax.aot import collectives as coll
from uvit_jax.aot.fit import fit_search
from uvit_jax.aot.programs import make_programs
from uvit_jax.aot.report import program_report
from uvit_jax.errors import ConfigError
from uvit_jax.parallel import gpu_target, xla_flags
from uvit_jax.parallel import topology as topo
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train import flops
from uvit_jax.train.step import make_train_program


def tiny_config(data: int, fsdp: int):
    """The default's runlocal model made wide enough (D=128) for FSDP to split its matrices."""
    c = get_config("runlocal")
    c.model.update(embed_dim=128, depth=2, num_heads=2)
    # One pass per step: the fit search's line assumes memory that grows with the batch.
    c.train.update(batch_size=16, micro_batch_per_device=0)
    c.mesh.update(data=data, fsdp=fsdp)
    c.optim.name = "adamw"  # the paper configs' optimizer: its state shards with the weights
    return c


def train_report(c, topology: str, slices: int = 1, chip=None):
    devices = topo.topology_devices(topology, slices)
    mesh = make_mesh(c.mesh, devices)
    (program,) = make_programs(c, mesh, ("train_step",))
    return program_report(program, mesh, chip or topo.parse_topology(topology).chip), mesh


def shard_bytes(tree) -> int:
    """Bytes of one device's shards of an abstract, sharded pytree."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


# ---- topology names and the TPU runtime ---------------------------------------------------


def test_topology_names_and_their_errors():
    assert topo.parse_topology("v5p:4x4x2").num_chips == 32
    assert topo.parse_topology("v5p-128").name == "v5p:4x4x4"  # TensorCores, two per chip
    assert topo.parse_topology("v5e-256").name == "v5e:16x16"
    assert topo.parse_topology("v6e:8x8").num_chips == 64
    assert topo.parse_topology("h100-8").num_chips == 8 and topo.parse_topology("h100").is_gpu
    for bad in ("v9:2x2", "v5e:2x2x2", "v5p-3", "tpu", "h100-9"):
        with pytest.raises(ConfigError, match=r"v5e:AxB .* v5p-N"):
            topo.parse_topology(bad)


@pytest.mark.parametrize("name", ["v5e:1x1", "v5p:2x2x1", "v6e:1x1"])
def test_chip_hbm_is_what_the_compiler_allows(name):
    """A buffer 1% under the chip table's HBM compiles; 1% over it, the TPU compiler refuses."""
    (device,) = topo.topology_devices(name)[:1]
    mesh = jax.make_mesh((1,), ("x",), devices=[device])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    hbm = topo.parse_topology(name).chip.hbm_bytes
    for scale, fits in ((0.99, True), (1.01, False)):
        size = int(scale * hbm / 4)
        program = jax.jit(lambda n=size: jax.numpy.ones((n,), "float32"), out_shardings=sharding)
        if fits:
            program.lower().compile()
        else:
            with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
                program.lower().compile()


def test_missing_tpu_compiler_names_the_pip_command(monkeypatch):
    real = topo.importlib.util.find_spec
    monkeypatch.setattr(
        topo.importlib.util, "find_spec", lambda n: None if n == "libtpu" else real(n)
    )
    with pytest.raises(ConfigError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
        topo.topology_devices("v5e:2x2")


def test_missing_cuda_plugin_names_the_pip_command(monkeypatch):
    real = topo.importlib.util.find_spec
    monkeypatch.setattr(
        topo.importlib.util, "find_spec", lambda n: None if n == "jax_plugins" else real(n)
    )
    with pytest.raises(ConfigError, match=rf'pip install "jax\[cuda12\]=={jax.__version__}"'):
        topo.topology_devices("h100-8")


def test_h100_target_config_is_the_h100():
    """What the compile-only H100 is told (the CUDA plugin reads this text): 132 SMs of
    compute capability 9.0 and 79.1 GiB of device memory."""
    text = gpu_target.h100_target_config()
    assert "core_count: 132" in text and "major: 9" in text
    assert "device_memory_size: 84942979072" in text
    assert text.count("{") == text.count("}")


def test_unused_tpu_runtime_leaves_the_cpu_alone(monkeypatch):
    """libtpu installed, no TPU: JAX_PLATFORMS=cpu (no TPU start-up errors); a TPU host or a
    user's own JAX_PLATFORMS is left alone."""
    env: dict[str, str] = {}
    xla_flags.add_cpu_flags(env, cores=2)
    assert env["JAX_PLATFORMS"] == "cpu"  # this host: libtpu from the test extra, no TPU
    env = {"JAX_PLATFORMS": "cuda"}
    xla_flags.add_cpu_flags(env, cores=2)
    assert env["JAX_PLATFORMS"] == "cuda"
    monkeypatch.setattr(xla_flags.glob, "glob", lambda p: ["/dev/accel0"] if "accel" in p else [])
    assert not xla_flags.tpu_runtime_without_tpu()


# ---- the collectives parser -------------------------------------------------------------


def test_replica_group_forms_map_to_mesh_axes():
    mesh = make_mesh(dict(data=2, fsdp=4), topo.topology_devices("v5e:2x4"))
    forms = {
        "replica_groups={{0,1,2,3},{4,5,6,7}}": ("fsdp",),
        "replica_groups=[4,2]<=[2,4]T(1,0)": ("data",),
        "replica_groups=[1,8]<=[8]": ("data", "fsdp"),
        "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}": ("data",),
    }
    for groups, axes in forms.items():
        line = (
            f"  %ag = bf16[64,128]{{1,0}} all-gather(%p), channel_id=1, {groups}, dimensions={{0}}"
        )
        (op,) = coll.collectives(line, mesh)
        n = 8 if axes == ("data", "fsdp") else (2 if axes == ("data",) else 4)
        assert (op.axes, op.group_size) == (axes, n)
        assert op.bytes_moved == 64 * 128 * 2 * (n - 1) / n


def test_loops_multiply_and_slices_are_dcn():
    mesh = make_mesh(dict(data=2, fsdp=1), topo.topology_devices("v5e:1x1", 2))
    hlo = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), channel_id=2, replica_groups={{0}}, to_apply=%add
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %send.1 = (f32[256]{0}, u32[], token[]) send(%g, %tok), channel_id=3, SEND_ATTRIBUTES
}
""".replace("SEND_ATTRIBUTES", 'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}')
    ops = coll.collectives(hlo, mesh)
    loop, dcn = ops
    assert (loop.kind, loop.count) == ("all-reduce", 7)
    assert (dcn.kind, dcn.axes, dcn.dcn, dcn.group_size) == ("all-reduce", ("slices",), True, 2)
    assert dcn.bytes_moved == 2 * 256 * 4 * (1 / 2)


# ---- what the compiler says of a train step --------------------------------------------------


@pytest.mark.integration
def test_fsdp_step_holds_a_quarter_of_the_state_and_gathers_over_fsdp():
    c = tiny_config(data=1, fsdp=4)
    row, mesh = train_report(c, "v5e:2x2")
    program = make_train_program(c, mesh)
    state = shard_bytes(program.abstract_state)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.abstract_state))
    assert state < 0.3 * whole  # the large matrices are split four ways
    batch = 16 // 4 * 28 * 28 * 1 * 4 + 16 // 4 * 4  # x and labels of one chip
    # Arguments: this chip's state shards + its batch rows + key and dashboard sums (bytes).
    assert row["memory"]["arguments"] == pytest.approx(state + batch, rel=0.03)
    assert row["memory"]["aliased"] == pytest.approx(state, rel=0.03)  # the donated state
    ops = row["collectives"]
    gathers = [r for r in ops if r["kind"] == "all-gather"]
    assert gathers and all(r["axes"] == "fsdp" for r in gathers)
    # Parameters are gathered in bf16 (the compute dtype): about 2 bytes x 3/4 of every
    # split weight, forward and backward, so at least once each.
    split = sum(
        x.size for x in jax.tree.leaves(program.abstract_state.params) if x.sharding.spec != ()
    )
    assert sum(r["bytes"] for r in gathers) >= 2 * split * 3 / 4
    assert not [r for r in ops if "data" in r["axes"]]
    # XLA adds the elementwise work (LayerNorm, GELU, softmax, Adam) to the model's matmuls.
    assert 1.0 <= row["flops_ratio"] < 1.25


@pytest.mark.integration
def test_data_parallel_step_only_all_reduces_the_gradients():
    c = tiny_config(data=4, fsdp=1)
    row, mesh = train_report(c, "v5e:2x2")
    params = make_train_program(c, mesh).abstract_state.params
    grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))  # float32 gradients
    kinds = {(r["kind"], r["axes"]) for r in row["collectives"]}
    assert kinds == {("all-reduce", "data")}
    moved = sum(r["bytes"] for r in row["collectives"])
    assert moved == pytest.approx(2 * grad_bytes * 3 / 4, rel=0.01)  # ring: 2 (n - 1) / n


@pytest.mark.integration
def test_two_slices_reduce_the_gradients_over_dcn():
    c = tiny_config(data=2, fsdp=4)
    row, mesh = train_report(c, "v5e:2x2", slices=2)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices == np.arange(2)[:, None]).all()  # data spans the slices, fsdp within one
    dcn = [r for r in row["collectives"] if r["dcn"]]
    assert dcn and {r["axes"] for r in dcn} == {"slices"}
    assert row["dcn_bytes"] > 0 and row["roofline"]["dcn_s"] > 0
    assert all(r["axes"] == "fsdp" for r in row["collectives"] if not r["dcn"])


def test_mesh_that_does_not_divide_the_slice_names_both_numbers():
    with pytest.raises(ConfigError, match=r"config.mesh.data=3 x config.mesh.fsdp=1 != 4"):
        make_mesh(dict(data=3, fsdp=1), topo.topology_devices("v5e:2x2"))
    with pytest.raises(ConfigError, match=r"config.mesh.data=1 must be a multiple of the 2"):
        make_mesh(dict(data=1, fsdp=8), topo.topology_devices("v5e:2x2", 2))


@pytest.mark.integration
def test_fit_search_reports_what_does_not_fit_and_the_largest_batch():
    """A chip made small enough that the unsharded state does not fit: the search moves to
    FSDP, says what the refused mesh needs, and its largest batch is one that compiled to fit
    (the next larger one compiled did not)."""
    c = tiny_config(data=4, fsdp=1)
    devices = topo.topology_devices("v5e:2x2")
    real = topo.parse_topology("v5e:2x2").chip
    dp_row, _ = train_report(c, "v5e:2x2")
    fsdp_row, _ = train_report(tiny_config(1, 4), "v5e:2x2")
    # Just short of what data parallelism needs: FSDP over 4 fits, with room for more examples.
    capacity = 0.99 * dp_row["memory"]["peak"]
    assert fsdp_row["memory"]["peak"] < capacity < dp_row["memory"]["peak"]
    chip = type(real)(**{**real.__dict__, "hbm_bytes": capacity})
    result = fit_search(c, devices, chip, ("none",))
    rows = result["rows"]
    assert (rows[0]["mesh"]["fsdp"], rows[0]["fits"]) == (1, False)
    assert rows[0]["memory"]["peak"] > capacity
    best = result["best"]
    assert best["fits"] and best["mesh"]["fsdp"] > 1 and best["batch"] == 16
    largest = result["largest_batch"]["none"]  # on the fully sharded mesh
    sharded = [r for r in rows if r["mesh"]["fsdp"] == 4]
    assert largest > 16 and largest in {r["batch"] for r in sharded if r["fits"]}
    assert all(not r["fits"] for r in sharded if r["batch"] > largest)
    assert result["predicted_limit"]["none"] >= largest


# ---- the job, as a user runs it ---------------------------------------------------------------


def _main(tmp_path, *overrides):
    cmd = [
        sys.executable, str(REPO / "main.py"),
        "--config", str(REPO / "configs/fashion_mnist_uvit.py") + ":runlocal",
        "--mode", "compile", "--workdir", str(tmp_path), *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


@pytest.mark.integration
def test_compile_job_prints_the_table_and_writes_the_json(tmp_path):
    run = _main(
        tmp_path,
        "--config.compile.topology=v5e-4",
        "--config.compile.programs=train_step,sample_network,sampler",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "program" in run.stdout and "roofline ms" in run.stdout
    result = json.loads((tmp_path / "compile" / "v5e-2x2.json").read_text())
    assert [r["program"] for r in result["programs"]] == ["train_step", "sample_network", "sampler"]
    assert result["chips"] == 4 and result["device_kind"].startswith("TPU v5")
    # The sampler runs its network once per step (+ the final denoising step): its FLOPs.
    c = get_config("runlocal")
    nfe = c.sample.steps + int(c.sample.denoise_to_zero)
    network, sampler = result["programs"][1:]
    assert sampler["model_flops_per_chip"] == pytest.approx(nfe * network["model_flops_per_chip"])
    assert result["programs"][0]["fits"] and result["programs"][0]["roofline"]["step_s"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.compile.topology=v7x:2x2"], "config.compile.topology='v7x:2x2': unknown"),
        ([], "--mode compile needs config.compile.topology"),
        (
            ["--config.compile.topology=v5e:2x2", "--config.mesh.data=3"],
            "config.mesh.data=3 x config.mesh.fsdp=1 != 4 devices",
        ),
    ],
)
@pytest.mark.integration
def test_compile_job_errors_are_one_line(tmp_path, overrides, message):
    run = _main(tmp_path, *overrides)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_huge_model_at_the_paper_batch_fits_a_v5p_slice():
    """U-ViT-H/2 (ImageNet 256, batch 1024), FSDP over the 32 chips of v5p:4x4x2 (about two
    minutes of compiling on 2 cores): its state is split 32 ways, and the step fits 95 GB."""
    from configs.paper import paper_config

    c = paper_config("imagenet256_uvit_huge")
    c.mesh.update(data=1, fsdp=32)
    row, mesh = train_report(c, "v5p:4x4x2")
    state = shard_bytes(make_train_program(c, mesh).abstract_state)
    assert row["fits"] and row["memory"]["peak"] < 95e9
    assert row["memory"]["aliased"] == pytest.approx(state, rel=0.03)
    assert row["model_flops_per_chip"] == pytest.approx(
        3 * 1024 * flops.forward_flops(c.model) / 32
    )
    # The weight gradients are reduce-scattered over fsdp inside their matmuls (rings of
    # collective-permutes, the TPU compiler's windowed einsums) and the weights all-gathered.
    sources = {(r["kind"], r["source"]) for r in row["collectives"]}
    assert ("collective-permute", "transpose(jvp())/dot_general") in sources
    assert ("all-gather", "jvp()/dot_general") in sources
