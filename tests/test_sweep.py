"""Ray Tune sweeps into a real MLflow server, read back over REST and in a real browser."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from hfedmoe.platform.config import ConfigError, parse_config
from hfedmoe.tracking.ui import runs_table_urls
from hfedmoe.tuning.sweep import (
    DRIVER_CPUS,
    load_sweep,
    param_space,
    run_sweep,
    trial_bundles,
    trial_config,
    trial_share,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def write_sweep(directory: Path, **fields) -> Path:
    sweep = {
        "name": "tiny-sweep",
        "base": str(TINY),
        "overrides": {"federation.rounds": 2},
        "search": {
            "hfedmoe.tau": {"grid": [0.1, 0.3]},
            "federation.strategy": {"grid": ["hfedmoe", "budget_random"]},
        },
        "storage_path": str(directory / "sweeps"),
        "target_accuracy": 0.25,
        **fields,
    }
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_a_bad_search_value_fails_before_any_trial(tmp_path):
    path = write_sweep(tmp_path, search={"hfedmoe.tau": {"grid": [0.1, 1.5]}})
    with pytest.raises(ConfigError, match=r"sweep.search.hfedmoe.tau = 1.5") as err:
        load_sweep(path)
    assert "less than or equal to 1" in str(err.value)
    misspelled = write_sweep(tmp_path, search={"hfedmoe.taux": {"grid": [0.1]}})
    with pytest.raises(ConfigError, match="taux"):
        load_sweep(misspelled)
    two_kinds = write_sweep(tmp_path, search={"hfedmoe.tau": {"grid": [0.1], "uniform": [0, 1]}})
    with pytest.raises(ConfigError, match="exactly one of"):
        load_sweep(two_kinds)


def test_an_unreachable_sweep_tracking_server_fails_before_any_trial(tmp_path):
    path = write_sweep(tmp_path, tracking_uri="http://127.0.0.1:5999")  # nothing listens
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking_uri http://127.0.0.1:5999: no answer"):
        run_sweep(path, progress=False)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "sweeps").exists()  # nothing was started or written


@pytest.mark.parametrize("name", ["sweep_smoke.yaml", "sweep_large.yaml"])
def test_shipped_sweeps_load_and_every_probe_is_valid(name, monkeypatch):
    monkeypatch.chdir(REPO)  # their data paths are relative to the checkout
    sweep, _base = load_sweep(REPO / "configs" / name)
    assert sweep.search


def test_asha_needs_accuracy_every_round_of_one_round_count(tmp_path):
    asha = {"grace_period": 1, "reduction_factor": 2}
    searched = write_sweep(tmp_path, asha=asha, search={"federation.rounds": {"grid": [2, 3]}})
    with pytest.raises(ConfigError, match=r"do not search \['federation.rounds'\]"):
        load_sweep(searched)
    sparse = write_sweep(tmp_path, asha=asha, overrides={"federation.eval_every": 2})
    with pytest.raises(ConfigError, match=r"set federation\.eval_every: 1"):
        load_sweep(sparse)


def test_named_budget_distributions_are_searched_by_name(tmp_path):
    tiers = yaml.safe_load(TINY.read_text())["budgets"]["tiers"]
    named = {
        "uniform": {"distribution": "dirichlet", "dirichlet_concentration": 100.0, "tiers": tiers},
        "skewed": {"distribution": "dirichlet", "dirichlet_concentration": 0.1, "tiers": tiers},
    }
    path = write_sweep(tmp_path, search={"budgets": {"grid": named}, "seed": {"randint": [0, 9]}})
    sweep, base = load_sweep(path)
    space = param_space(sweep)
    assert space["budgets"]["grid_search"] == ["uniform", "skewed"]
    cfg = trial_config(sweep, base, {"budgets": "skewed", "seed": 4})
    assert cfg.budgets.dirichlet_concentration == 0.1 and cfg.seed == 4
    assert cfg.federation.rounds == 2  # the override still applies


def test_trial_placement_group_holds_every_actor_the_trial_creates():
    cfg = parse_config(yaml.safe_load(TINY.read_text()))
    from hfedmoe.platform.federation import build_federation

    footprint = build_federation(cfg)[0].footprint
    bundles = trial_bundles(cfg, per_trial=2.0, footprint=footprint)
    actors = bundles[1:-1]
    # Two resource shapes (1/8 and 1 CPU) on 2 - 0.26 CPUs: one actor each.
    assert sorted(b["CPU"] for b in actors) == [0.125, 1.0]
    assert all(b["memory"] > 0 for b in actors)
    assert bundles[0] == {"CPU": DRIVER_CPUS}
    assert sum(b["CPU"] for b in bundles) <= 2.0


def test_trials_at_once_follow_the_cluster(tmp_path):
    sweep, base = load_sweep(write_sweep(tmp_path))
    base_cfg = parse_config(base)
    assert trial_share(sweep, base_cfg, cluster_units=2.0) == (2.0, 1)
    per_trial, concurrent = trial_share(sweep, base_cfg, cluster_units=16.0)
    assert concurrent == 7 and per_trial == pytest.approx(2.26)
    fixed = sweep.model_copy(update={"trial_units": 3.0})
    with pytest.raises(ConfigError, match="no trial could ever start"):
        trial_share(fixed, base_cfg, cluster_units=2.0)


@pytest.fixture(scope="module")
def finished_sweep(ray_address, mlflow_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep")
    # Half the trials fail right after their round-0 checkpoint; Tune retries each once.
    search = {
        "federation.strategy": {"grid": ["hfedmoe", "budget_random"]},
        "faults.driver_crash": {"grid": [None, 0]},
    }
    path = write_sweep(
        directory,
        search=search,
        max_failures=1,
        tracking_uri=mlflow_server.url,
        experiment="tiny-sweep",
    )
    return run_sweep(path, progress=False)


def _get(url: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}") as response:
        return json.load(response)


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


@pytest.mark.ray
def test_sweep_trials_are_child_runs_in_the_mlflow_server(finished_sweep, mlflow_server):
    assert len(finished_sweep.rows) == 4
    assert all(r["status"] == "OK" and r["round"] == 2 for r in finished_sweep.rows)
    with open(finished_sweep.sweep_dir / "trials.csv") as f:
        table = list(csv.DictReader(f))
    # The failed trials were retried from their checkpoints and say so (values as
    # labelled for Tune: None is "null").
    assert {(r["faults.driver_crash"], r["federation.strategy"], r["attempts"]) for r in table} == {
        ("null", "hfedmoe", "1"), ("null", "budget_random", "1"),
        ("0", "hfedmoe", "2"), ("0", "budget_random", "2"),
    }  # fmt: skip
    experiment = _get(mlflow_server.url, "/api/2.0/mlflow/experiments/get-by-name",
                      experiment_name="tiny-sweep")["experiment"]  # fmt: skip
    parent = finished_sweep.parent_run_id
    children = _post(
        mlflow_server.url,
        "/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.mlflow.parentRunId = '{parent}'",
        },
    )["runs"]
    assert len(children) == 4
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        run_id = child["info"]["run_id"]
        history = _get(mlflow_server.url, "/api/2.0/mlflow/metrics/get-history",
                       run_id=run_id, metric_key="accuracy")["metrics"]  # fmt: skip
        assert sorted(m["step"] for m in history) == [0, 1]  # once each, retried or not
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert params["federation.rounds"] == "2"
    parent_run = _get(mlflow_server.url, "/api/2.0/mlflow/runs/get", run_id=parent)["run"]
    assert parent_run["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"]: m["value"] for m in parent_run["data"]["metrics"]}
    assert parent_metrics["retried_trials"] == 2 and parent_metrics["failed_trials"] == 0
    files = _get(mlflow_server.url, "/api/2.0/mlflow/artifacts/list", run_id=parent)["files"]
    assert {"trials.csv", "best_config.yaml", "sweep.yaml"} <= {f["path"] for f in files}
    best = yaml.safe_load((finished_sweep.sweep_dir / "best_config.yaml").read_text())
    assert best["federation"]["rounds"] == 2


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium not installed (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)  # fmt: skip
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.ray
def test_browser_lists_the_sweep_child_runs(finished_sweep, mlflow_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment = _get(mlflow_server.url, "/api/2.0/mlflow/experiments/get-by-name",
                      experiment_name="tiny-sweep")["experiment"]  # fmt: skip
    search = {"experiment_ids": [experiment["experiment_id"]]}
    runs = _post(mlflow_server.url, "/api/2.0/mlflow/runs/search", search)["runs"]
    names = [
        r["info"]["run_name"] for r in runs if r["info"]["run_id"] != finished_sweep.parent_run_id
    ]
    # The page `hfedmoe ui` prints for the experiment: its runs table.
    page_url = runs_table_urls(mlflow_server.url)["tiny-sweep"]
    assert page_url.endswith(f"/#/experiments/{experiment['experiment_id']}/runs")
    browser = _browser()
    try:
        browser.get(page_url)
        rows = ".ag-row button[data-component-id*='runnamecellrenderer']"
        wait = WebDriverWait(browser, 60)
        expander = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, rows))[0]
        expander.click()  # the parent run's row: show its children
        wait.until(
            lambda b: all(name in b.find_element(By.TAG_NAME, "body").text for name in names)
        )
        time.sleep(1)  # let the grid paint before the screenshot
        shot = tmp_path / "mlflow_sweep_runs.png"
        browser.save_screenshot(str(shot))
        keep = os.environ.get("HFEDMOE_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)
        page = browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
    assert len(names) == 4 and all(name in page for name in names)
    assert shot.stat().st_size > 10_000
