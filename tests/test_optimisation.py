"""Strategy hooks beyond FedAvg: FedProx, SCAFFOLD, server optimisers, their config and plugins.

Each update rule against hand-computed values; then the hooks on the client's tensors and
the aggregator, and short in-process federations of configs/tiny.yaml size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hfedmoe.cli import main
from hfedmoe.launch import launch
from hfedmoe.platform.config import ConfigError, HFedMoEConfig, parse_config
from hfedmoe.platform.errors import InjectedFault
from hfedmoe.platform.executors import run_in_process
from hfedmoe.platform.plugins import load_plugin
from hfedmoe.platform.records import ModelState, Updated
from hfedmoe.platform.strategies import (
    CLIENT_UPDATES,
    REGISTRIES,
    SERVER_UPDATES,
    Strategy,
    build_strategy,
)
from hfedmoe.platform.strategies.client_updates import (
    FedProx,
    FedProxParams,
    Scaffold,
    proximal_gradient,
    scaffold_client_variate,
    scaffold_corrected_gradient,
    scaffold_server_variate,
)
from hfedmoe.platform.strategies.server_updates import (
    AdaptiveParams,
    FedAdam,
    fedadagrad_step,
    fedadam_step,
    fedavgm_step,
    fedyogi_step,
)

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
# float64 arithmetic of a handful of operations: relative error a few ulps.
EXACT = {"rtol": 1e-12, "atol": 0.0}


def tiny(tmp_path: Path, faults: dict | None = None, **federation) -> object:
    """configs/tiny.yaml, tracking off, with these federation fields (and faults)."""
    raw = {**TINY, "output_dir": str(tmp_path), "tracking": {"enabled": False}}
    raw["federation"] = {**TINY["federation"], **federation}
    return parse_config({**raw, "faults": faults or {}})


# ---- the update rules, by hand -------------------------------------------------------------


def test_proximal_gradient_by_hand():
    # grad + mu (w - w_g) = [1 + 0.1 * 0.5, -2 + 0.1 * (1 - 2)] = [1.05, -2.1]
    grad = proximal_gradient(
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([0.5, 1.0], dtype=torch.float64),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        mu=0.1,
    )
    np.testing.assert_allclose(grad.numpy(), [1.05, -2.1], **EXACT)


def test_scaffold_equations_by_hand():
    # g - c_i + c = [1 - 0.5 + 0.25, 2 - 0 + 1] = [0.75, 3]
    corrected = scaffold_corrected_gradient(
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        torch.tensor([0.5, 0.0], dtype=torch.float64),
        torch.tensor([0.25, 1.0], dtype=torch.float64),
    )
    np.testing.assert_allclose(corrected.numpy(), [0.75, 3.0], **EXACT)
    # c_i - c + (x - y)/(K lr) = [0.5 - 0.25 + 0.2/0.2, 0 - 1 + (-0.2)/0.2] = [1.25, -2]
    c_i = scaffold_client_variate(
        np.array([0.5, 0.0]), np.array([0.25, 1.0]), np.array([1.0, 1.0]),
        np.array([0.8, 1.2]), steps=2, lr=0.1,
    )  # fmt: skip
    np.testing.assert_allclose(c_i, [1.25, -2.0], **EXACT)
    # c + sum/N = [0.25 + 0.5/4, 1 - 1/4] = [0.375, 0.75]
    c = scaffold_server_variate(np.array([0.25, 1.0]), np.array([0.5, -1.0]), num_clients=4)
    np.testing.assert_allclose(c, [0.375, 0.75], **EXACT)


def test_fedavgm_step_by_hand():
    # m = 0.9 * 0.2 + 0.5 = 0.68; x = 1 + 1.0 * 0.68
    x, m = fedavgm_step(np.array([1.0]), np.array([0.5]), np.array([0.2]), lr=1.0, momentum=0.9)
    np.testing.assert_allclose([x[0], m[0]], [1.68, 0.68], **EXACT)


# x = 1, Delta = 0.1, m = 0, v = tau^2 = 1e-6, lr = 0.01, beta1 = 0.9, beta2 = 0.99:
# m = 0.1 * 0.1 = 0.01 in every rule.
ADAPTIVE = {"lr": 0.01, "beta1": 0.9, "tau": 1e-3}


def test_fedadam_step_by_hand():
    # v = 0.99e-6 + 0.01 * 0.01 = 1.0099e-4; x = 1 + 0.01 * 0.01 / (sqrt(1.0099e-4) + 1e-3)
    x, m, v = fedadam_step(*_start(), beta2=0.99, **ADAPTIVE)
    np.testing.assert_allclose([x[0], m[0], v[0]], [1.0090502831185222, 0.01, 1.0099e-4], **EXACT)


def test_fedyogi_step_by_hand():
    # sign(v - Delta^2) = sign(1e-6 - 0.01) = -1: v = 1e-6 + 0.01 * 0.01 = 1.01e-4
    x, m, v = fedyogi_step(*_start(), beta2=0.99, **ADAPTIVE)
    np.testing.assert_allclose([x[0], m[0], v[0]], [1.0090498756211208, 0.01, 1.01e-4], **EXACT)


def test_fedadagrad_step_by_hand():
    # v = 1e-6 + 0.01 = 0.010001; x = 1 + 0.01 * 0.01 / (sqrt(0.010001) + 1e-3)
    x, m, v = fedadagrad_step(*_start(), **ADAPTIVE)
    np.testing.assert_allclose([x[0], m[0], v[0]], [1.00099004999875, 0.01, 0.010001], **EXACT)


def _start():
    return np.array([1.0]), np.array([0.1]), np.array([0.0]), np.array([1e-6])


# ---- the hooks on tensors and states ---------------------------------------------------------


def _state(expert_rows, shared=(0.0,)) -> ModelState:
    return ModelState(
        shared={"s": np.array(shared, dtype=np.float64)},
        gates={},
        experts=[{"w": np.array(expert_rows, dtype=np.float64)}],
    )


def _leaf(values, grad=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    t.grad = None if grad is None else torch.tensor(grad, dtype=torch.float64)
    return t


def test_fedprox_corrects_only_what_a_step_trains():
    fedprox = FedProx(FedProxParams(mu=0.5))
    fedprox.start(_state([[0.0, 0.0], [1.0, -1.0]]), {}, {})
    trained = _leaf([2.0, 1.0], grad=[0.1, 0.2])  # expert 1 this step
    idle = _leaf([0.0, 0.0])  # expert 0: selected by nobody, no gradient
    fedprox.correct({"expert/0/1/w": trained, "expert/0/0/w": idle})
    # 0.1 + 0.5 (2 - 1), 0.2 + 0.5 (1 + 1)
    np.testing.assert_allclose(trained.grad.numpy(), [0.6, 1.2], **EXACT)
    assert idle.grad is None


def test_scaffold_client_round_is_sparse_and_counts_steps_per_tensor():
    scaffold = Scaffold(Scaffold.Params())
    start = _state([[0.0, 0.0], [1.0, 1.0]])
    server = scaffold.initial_server_state(start)
    assert set(server) == {"scaffold/c/shared/s", "scaffold/c/expert/0/w"}
    server["scaffold/c/expert/0/w"] = np.array([[9.0, 9.0], [0.25, 1.0]])
    own = {"expert/0/1/w": np.array([0.5, 0.0])}
    scaffold.start(start, scaffold.client_view(server), own)
    row = _leaf([1.0, 1.0], grad=[1.0, 2.0])
    idle = _leaf([0.0, 0.0])
    scaffold.correct({"expert/0/1/w": row, "expert/0/0/w": idle})
    np.testing.assert_allclose(row.grad.numpy(), [0.75, 3.0], **EXACT)  # g - c_i + c
    assert idle.grad is None
    row.grad = torch.tensor([0.0, 0.0], dtype=torch.float64)
    scaffold.correct({"expert/0/1/w": row})  # a second step trains expert 1
    with torch.no_grad():
        row.copy_(torch.tensor([0.8, 1.2], dtype=torch.float64))
    changes = scaffold.finish({"expert/0/1/w": row, "expert/0/0/w": idle}, lr=0.1)
    # Only the trained row: c_i+ = [1.25, -2] (K = 2, by hand above), change c_i+ - c_i.
    assert set(changes) == {"expert/0/1/w"}
    np.testing.assert_allclose(changes["expert/0/1/w"], [0.75, -2.0], **EXACT)
    # The server folds the summed changes over N: row 1 moves, row 0 and shared do not.
    scaffold.update_server(server, {"expert/0/w": np.array([[0.0, 0.0], [0.5, -1.0]])}, 4)
    np.testing.assert_allclose(server["scaffold/c/expert/0/w"], [[9, 9], [0.375, 0.75]], **EXACT)


def test_server_optimiser_moves_only_updated_rows_and_their_moments():
    fedadam = FedAdam(AdaptiveParams())
    previous = _state([[1.0], [1.0], [1.0]], shared=(1.0,))
    aggregate = _state([[1.1], [1.0], [0.9]], shared=(1.0,))
    server = fedadam.initial_server_state(previous)
    before = {k: v.copy() for k, v in server.items()}
    updated = Updated(shared=False, gates=False, experts=np.array([[True, False, True]]))
    new = fedadam.update(previous, aggregate, updated, server)
    x0, m0, v0 = fedadam_step(np.array([1.0]), np.array([0.1]), np.array([0.0]),
                              np.array([1e-6]), 0.01, 0.9, 0.99, 1e-3)  # fmt: skip
    w = new.experts[0]["w"]
    np.testing.assert_allclose(w[0], x0, rtol=1e-12)
    np.testing.assert_allclose(w[2], 2.0 - x0, rtol=1e-12)  # Delta = -0.1: the mirror image
    assert w[1, 0] == 1.0  # nobody trained expert 1: value and moments kept
    m, v = server["fedadam/m/expert/0/w"], server["fedadam/v/expert/0/w"]
    assert m[1, 0] == 0.0 and v[1, 0] == 1e-6
    np.testing.assert_allclose([m[0, 0], v[0, 0]], [m0[0], v0[0]], rtol=1e-12)
    assert new.shared["s"][0] == 1.0 and server["fedadam/m/shared/s"][0] == 0.0
    # The input arrays are never edited: a re-run round starts from the same state.
    for key, value in before.items():
        assert key in server and np.array_equal(value, before[key])


def test_aggregator_returns_a_new_server_state_and_keeps_the_given_one():
    from hfedmoe.platform.strategies import round_aggregator

    cfg = tiny(Path("."), server_update="fedadam")
    strategy = build_strategy(cfg)
    previous = _state([[1.0], [1.0]])
    server = strategy.initial_server_state(previous)
    given = {k: v.copy() for k, v in server.items()}
    aggregator = round_aggregator(cfg, strategy, previous, server)
    state, _, new_server = aggregator.finalize()  # no uploads: nothing moves
    assert all(np.array_equal(server[k], given[k]) for k in given)
    assert all(np.array_equal(new_server[k], given[k]) for k in given)
    assert np.array_equal(state.experts[0]["w"], previous.experts[0]["w"])


# ---- config ---------------------------------------------------------------------------------


def test_parts_compose_with_any_selection_rule_and_take_their_params():
    cfg = tiny(
        Path("."),
        strategy="budget_random",
        client_update={"name": "fedprox", "params": {"mu": 0.3}},
        server_update={"name": "fedyogi", "params": {"lr": 0.02, "tau": 0.01}},
    )
    strategy = build_strategy(cfg)
    assert strategy.name == "budget_random"
    assert strategy.client_update.params.mu == 0.3
    assert (strategy.server_rule.name, strategy.server_rule.params.lr) == ("fedyogi", 0.02)
    assert strategy.server_rule.params.beta2 == 0.99  # Reddi et al.'s default
    # A bare name round-trips as a bare name (sweeps and old run directories).
    dumped = cfg.model_dump(mode="json")["federation"]
    assert dumped["strategy"] == "budget_random"
    assert dumped["client_update"] == {"name": "fedprox", "params": {"mu": 0.3}}
    assert parse_config({"federation": dumped}).federation == cfg.federation


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"client_update": "fedadam"}, r"federation.client_update: .*unknown federation."
         r"client_update 'fedadam'; choose one of plain, fedprox, scaffold"),
        ({"server_update": "adam"}, r"unknown federation.server_update 'adam'; .*fedavg"),
        ({"server_update": {"name": "fedadam", "params": {"lr": 0}}},
         r"federation.server_update.params.lr: Input should be greater than 0 \(got 0\)"),
        ({"client_update": {"name": "fedprox", "params": {"nu": 1}}},
         r"federation.client_update.params.nu: Extra inputs are not permitted"),
        ({"strategy": {"name": "hfedmoe", "params": {"mu": 1}}},
         r"federation.strategy.params.mu: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_bad_parts_are_one_line_errors_naming_the_field(federation, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config({"federation": federation})
    assert len(str(err.value).splitlines()) == 1  # one line: the field, the problem, the fix


# ---- federations ---------------------------------------------------------------------------


def _same_state(a: ModelState, b: ModelState) -> bool:
    flat_a, flat_b = a.to_flat(), b.to_flat()
    return flat_a.keys() == flat_b.keys() and all(
        np.array_equal(flat_a[k], flat_b[k]) for k in flat_a
    )


def test_hfedmoe_with_fedprox_runs_and_mu_zero_is_plain(tmp_path):
    plain = run_in_process(tiny(tmp_path))
    zero = run_in_process(tiny(tmp_path, client_update={"name": "fedprox", "params": {"mu": 0}}))
    pulled = run_in_process(tiny(tmp_path, client_update={"name": "fedprox", "params": {"mu": 1}}))
    assert _same_state(plain.state, zero.state)
    assert not _same_state(plain.state, pulled.state)
    assert all(r.succeeded == r.sampled for r in pulled.history.rounds)


def test_hfedmoe_with_scaffold_keeps_sparse_variates_and_doubles_traffic(tmp_path):
    plain = run_in_process(tiny(tmp_path))
    run = run_in_process(tiny(tmp_path, client_update="scaffold"))
    first, first_plain = run.history.rounds[0], plain.history.rounds[0]
    # Round 0 is plain training (c = c_i = 0); the upload carries c_i+ - c_i beside it.
    assert first.bytes_up == 2 * first_plain.bytes_up
    assert first.bytes_down == 2 * first_plain.bytes_down  # model and c
    assert not _same_state(plain.state, run.state)
    clients = {c.client for c in run.history.clients if c.failure is None}
    assert set(run.variates) == clients  # only clients that trained, each its trained rows
    for client, variates in run.variates.items():
        trained = [c.experts_trained for c in run.history.clients if c.client == client]
        experts = [k for k in variates if k.startswith("expert/")]
        assert 0 < len({k.rsplit("/", 1)[0] for k in experts}) <= sum(trained)
    assert np.abs(run.server_state["scaffold/c/expert/0/" + _expert_tensor(run)]).sum() > 0


def _expert_tensor(run) -> str:
    return next(iter(run.state.experts[0]))


def test_hfedmoe_with_fedadam_moves_past_the_aggregate(tmp_path):
    fedavg = run_in_process(tiny(tmp_path))
    fedadam = run_in_process(tiny(tmp_path, server_update="fedadam"))
    assert not _same_state(fedavg.state, fedadam.state)
    moments = {k.split("/")[1] for k in fedadam.server_state}
    assert moments == {"m", "v"} and fedadam.history.rounds[-1].experts_updated > 0


def test_resume_with_fedadam_and_scaffold_equals_an_uninterrupted_run(tmp_path):
    federation = {"rounds": 3, "client_update": "scaffold", "server_update": "fedadam"}
    cfg = tiny(tmp_path, **federation)
    crashing = tiny(tmp_path, faults={"driver_crash": 1}, **federation)
    run_dir = tmp_path / "crashed"
    with pytest.raises(InjectedFault):
        launch(crashing, run_dir=run_dir, in_process=True, progress=False)
    resumed = launch(resume=run_dir, in_process=True, progress=False)
    whole = run_in_process(cfg)
    assert _same_state(whole.state, resumed.state)
    assert [r.deterministic() for r in whole.history.rounds] == [
        r.deterministic() for r in resumed.history.rounds
    ]
    assert whole.server_state.keys() == resumed.server_state.keys()
    assert all(
        np.array_equal(whole.server_state[k], resumed.server_state[k]) for k in whole.server_state
    )
    # Variates are written per round for the clients it changed, never all N clients.
    files = sorted((run_dir / "variates").iterdir())
    participants = sum(r.succeeded for r in whole.history.rounds)
    assert 0 < len(files) <= participants
    assert (run_dir / "checkpoints" / "round-00002" / "server.safetensors").is_file()


# ---- plugins --------------------------------------------------------------------------------

PLUGIN = '''
import numpy as np
import torch

from hfedmoe.platform.strategies import ServerUpdate, Strategy, register


@register
class LowestFirst(Strategy):
    """Train the lowest-numbered routed experts."""

    name = "plugin_lowest_first"

    def expert_scores(self, routing):
        layers, experts = routing.union.shape
        return -torch.arange(experts, dtype=torch.float32).expand(layers, experts)


@register
class HalfStep(ServerUpdate):
    """previous + Delta / 2."""

    name = "plugin_half_step"

    def update(self, previous, aggregate, updated, server):
        from hfedmoe.platform.records import ModelState

        before, after = previous.to_flat(), aggregate.to_flat()
        return ModelState.from_flat(
            {k: (before[k] + (after[k] - before[k]) / 2).astype(before[k].dtype) for k in before}
        )
'''


def write_plugin(tmp_path: Path) -> Path:
    path = tmp_path / "my_strategy.py"
    path.write_text(PLUGIN)
    return path


def forget_plugin(module_path: Path) -> None:
    """What a fresh process lacks: the plugin's classes and module."""
    for registry in REGISTRIES.values():
        for name in [n for n in registry if n.startswith("plugin_")]:
            del registry[name]
    for name in [m for m in sys.modules if m.startswith(f"hfedmoe_plugin_{module_path.stem}")]:
        del sys.modules[name]


def test_a_plugin_file_registers_its_classes_and_a_resume_imports_it_again(tmp_path, capsys):
    plugin = write_plugin(tmp_path)
    federation = {
        "rounds": 2,
        "strategy": "plugin_lowest_first",
        "server_update": "plugin_half_step",
    }
    raw = {**TINY, "output_dir": str(tmp_path), "tracking": {"enabled": False}}
    raw["federation"] = {**TINY["federation"], **federation}
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump({**raw, "faults": {"driver_crash": 0}}))
    run_dir = tmp_path / "run"
    forget_plugin(plugin)
    try:
        # Without --plugin the names are unknown; with it they are classes.
        assert main(["run", str(config), "--in-process", "--no-progress"]) == 2
        assert "unknown federation.strategy 'plugin_lowest_first'" in capsys.readouterr().err
        command = ["run", str(config), "--plugin", str(plugin), "--in-process", "--no-progress"]
        with pytest.raises(InjectedFault):
            main([*command, "--run-dir", str(run_dir)])
        forget_plugin(plugin)
        assert main(["run", "--resume", str(run_dir), "--in-process", "--no-progress"]) == 0
        resumed = launch(resume=run_dir, in_process=True, progress=False)  # all rounds done
        whole = run_in_process(parse_config(raw))
        assert _same_state(whole.state, resumed.state)
        assert whole.history.rounds[-1].experts_updated > 0
    finally:
        forget_plugin(plugin)


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        ("no_such_module_xyz", "ModuleNotFoundError"),
        ("missing.py", "FileNotFoundError"),
        ("broken.py", "RuntimeError: broken on purpose"),
    ],
)
def test_a_missing_or_broken_plugin_is_a_one_line_error_naming_it(tmp_path, capsys, plugin, why):
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    spec = str(tmp_path / plugin) if plugin.endswith(".py") else plugin
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(config), "--plugin", spec, "--in-process", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"hfedmoe: --plugin {spec}: cannot import it ({why}")
    assert "importable dotted module or the path of a .py file" in err
    with pytest.raises(ConfigError):
        load_plugin(spec)


def test_a_plugin_strategy_may_override_a_hook_directly():
    class Doubling(Strategy):
        name = "test_doubling_gradients"

        def correct_gradients(self, tensors):
            for t in tensors.values():
                if t.grad is not None:
                    t.grad = 2 * t.grad

    strategy = Doubling(HFedMoEConfig())
    t = _leaf([1.0], grad=[0.25])
    strategy.correct_gradients({"shared/s": t})
    assert t.grad.item() == 0.5
    assert "plain" in CLIENT_UPDATES and "fedavg" in SERVER_UPDATES
