"""The shipped table recipes against PROTOCOL.md, checked through the project's own recipe loader.

Every expected value below is written out from PROTOCOL.md (sections 1, 2,
5 and 6): an independent statement of the spec, never read back from the
code. Loops run over every table recipe in ``data_recipes/``, so a new recipe
is covered without new test code.
"""

from __future__ import annotations

from collections import Counter

import pytest

import pfedmoap_cli.methods  # noqa: F401  (registers every method)
from pfedmoap_cli.engine.session import method_options
from pfedmoap_cli.methods.base import get_method
from pfedmoap_cli.report.table_recipes import DatasetSpec, TableRecipe, available_tables, load_table_recipe
from pfedmoap_cli.seeding import sample_clients

#: PROTOCOL.md section 6: "CoOp: each client trains its own prompt on its own data only (25 epochs), no communication".
COOP_LOCAL_EPOCHS = 25

SHIPPED = sorted(available_tables())
PAPER_TABLES = ("1", "2", "3", "4")


def partition_clients(spec: DatasetSpec) -> int:
    """The number of clients a dataset entry's partition spec asks for (clients_per_domain x domains for domain splits)."""
    part = spec.partition
    if part.clients_per_domain is not None and spec.domains:
        return part.clients_per_domain * len(spec.domains)
    return part.clients


def times_sampled(recipe: TableRecipe, dataset: str, row: str, seed: int) -> tuple[int, Counter]:
    """(clients, how often the engine's sampler picks each client over the cell's rounds)."""
    settings = recipe.cell_settings(dataset, row, seed)
    clients = partition_clients(recipe.dataset(dataset))
    counts = Counter()
    for round_index in range(settings.rounds):
        counts.update(sample_clients(clients, settings.frac, settings.seed, round_index))
    return clients, counts


def test_every_paper_table_and_the_synthetic_ones_are_shipped():
    assert set(PAPER_TABLES) | {"baselines", "demo"} <= set(SHIPPED)


@pytest.mark.parametrize("table", SHIPPED)
def test_coop_trains_every_client_once_for_25_local_epochs(table):
    """CoOp: every client trains exactly once (one cosine schedule), 25 local epochs, in every cell and seed."""
    recipe = load_table_recipe(table)
    coop_rows = [row for row in recipe.rows if row.method == "coop"]
    if table in PAPER_TABLES:
        assert coop_rows, f"table {table} has no CoOp row"
    for row in coop_rows:
        for spec in recipe.datasets:
            for seed in recipe.seeds:
                settings = recipe.cell_settings(spec.key, row.key, seed)
                assert settings.local_epochs == COOP_LOCAL_EPOCHS, f"table {table} {spec.key} seed {seed}: CoOp trains {settings.local_epochs} local epochs"
                clients, counts = times_sampled(recipe, spec.key, row.key, seed)
                never = sorted(set(range(clients)) - set(counts))
                repeated = sorted(c for c, n in counts.items() if n > 1)
                assert not never and not repeated, (
                    f"table {table} {spec.key} seed {seed}: CoOp clients never trained {never}, trained more than once {repeated} "
                    f"(rounds {settings.rounds}, frac {settings.frac})"
                )
                assert set(counts) == set(range(clients))


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_paper_tables_draw_one_partition_per_seed(table):
    """Three seeds, and each seed's own partition (PROTOCOL.md section 4: a cell is mean +- std over 3 seeds)."""
    recipe = load_table_recipe(table)
    assert recipe.seeds == (1, 2, 3)
    assert recipe.per_seed_partitions
    assert [recipe.partition_seed_for(s) for s in recipe.seeds] == [1, 2, 3]
    assert recipe.partition_mode() == "partitions: one per seed (partition seed = run seed)"


@pytest.mark.parametrize("table", ["baselines", "demo"])
def test_synthetic_tables_keep_their_fixed_partition(table):
    recipe = load_table_recipe(table)
    assert recipe.partition_seed == 1 and not recipe.per_seed_partitions
    assert {recipe.partition_seed_for(s) for s in recipe.seeds} == {1}
    assert recipe.partition_mode() == "partitions: fixed, seed 1"


# ---- PROTOCOL.md section 5 (and the shared settings of sections 1, 2 and 6) ----------

#: Per paper table: datasets (in order), partition, the federated schedule, batch size (section 2:
#: the shots, 16, for the few-shot table, 32 otherwise), backbone (Table 2: not stated), K (Table 2: not stated).
PROTOCOL = {
    "1": dict(
        datasets=["flowers102", "oxford_pets", "food101", "caltech101", "dtd"],
        partition=dict(scheme="pathological", clients=10, shots=16),
        domains=None,
        rounds=10, frac=1.0, batch_size=16, backbone="RN50", experts=9,
        rows=["zsclip", "coop", "promptfl", "promptfl-ft", "fedper", "fedprox", "fedamp", "pfedprompt", "fedotp", "pfedmoap", "pfedmoap"],
        fedotp_eps=0.01,
    ),
    "2": dict(
        datasets=["cifar10", "cifar100"],
        partition=dict(scheme="dirichlet", clients=100, alpha=0.5, min_size=10),
        domains=None,
        rounds=120, frac=0.1, batch_size=32, backbone=None, experts=None,
        rows=None,
        fedotp_eps=0.1,
    ),
    "3": dict(
        datasets=["domainnet"],
        partition=dict(scheme="dirichlet", alpha=0.3, min_size=2, clients_per_domain=5),
        domains=["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
        rounds=25, frac=0.25, batch_size=32, backbone="ViT-B-16", experts=19,
        rows=["zsclip", "coop", "promptfl", "fedprox", "pfedmoap"],
        fedotp_eps=0.01,
    ),
    "4": dict(
        datasets=["office_caltech10"],
        partition=dict(scheme="dirichlet", alpha=0.3, min_size=2, clients_per_domain=5),
        domains=["amazon", "caltech", "dslr", "webcam"],
        rounds=25, frac=0.5, batch_size=32, backbone="ViT-B-16", experts=9,
        rows=["zsclip", "coop", "promptfl", "fedprox", "pfedmoap"],
        fedotp_eps=0.01,
    ),
}
TOTAL_CLIENTS = {"1": 10, "2": 100, "3": 30, "4": 20}  # N of section 5 (6 x 5, 4 x 5 for the domain tables)
#: Methods that train without the federated schedule (ZS-CLIP: no training; CoOp: local only, checked above).
NOT_FEDERATED = {"zsclip", "coop"}


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_paper_table_datasets_and_partitions(table):
    expected = PROTOCOL[table]
    recipe = load_table_recipe(table)
    assert [d.name for d in recipe.datasets] == expected["datasets"]
    for spec in recipe.datasets:
        part = spec.partition
        for key, value in expected["partition"].items():
            assert getattr(part, key) == value, (table, spec.key, key)
        assert partition_clients(spec) == TOTAL_CLIENTS[table] == part.clients
        if expected["domains"] is not None:
            assert list(spec.domains) == expected["domains"]  # domain-major client order of section 5
        else:
            assert part.clients_per_domain is None


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_paper_table_schedule_backbone_and_methods(table):
    expected = PROTOCOL[table]
    recipe = load_table_recipe(table)
    if expected["rows"] is not None:
        assert [r.method for r in recipe.rows] == expected["rows"]
    for spec in recipe.datasets:
        for row in recipe.rows:
            for seed in recipe.seeds:
                s = recipe.cell_settings(spec.key, row.key, seed)
                where = (table, spec.key, row.key, seed)
                assert s.seed == seed and s.method == row.method, where
                # Sections 1 and 2: the shared prompt learner and optimiser, openai weights.
                assert (s.lr, s.momentum, s.weight_decay, s.n_ctx, s.pretrained) == (0.002, 0.9, 0.0005, 16, "openai"), where
                if expected["backbone"] is not None:
                    assert s.backbone == expected["backbone"], where
                if expected["batch_size"] is not None:
                    assert s.batch_size == expected["batch_size"], where
                options = method_options(get_method(s.method), s.method_options)
                if row.method == "pfedmoap":
                    assert options.gating_lr == 0.01, where  # section 2: gating lr 0.01 constant
                    if expected["experts"] is not None:
                        assert options.num_experts == expected["experts"], where  # K
                if row.method == "fedprox":
                    assert options.mu == 0.5, where
                if row.method == "fedotp":
                    assert (options.eps, options.top_percent, options.threshold, options.max_iter) == (
                        expected["fedotp_eps"], 0.8, 1e-3, 100,
                    ), where
                if row.method in NOT_FEDERATED:
                    continue
                assert (s.rounds, s.frac, s.local_epochs) == (expected["rounds"], expected["frac"], 5), where


def test_table1_pfedmoap_rows_are_lambda_0_and_0_5():
    recipe = load_table_recipe("1")
    lams = []
    for row in recipe.rows:
        if row.method == "pfedmoap":
            s = recipe.cell_settings("dtd", row.key, 1)
            lams.append(method_options(get_method("pfedmoap"), s.method_options).lam)
    assert lams == [0.0, 0.5]


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_federated_rows_sample_the_protocols_share_of_clients(table):
    """frac x N participants per round (Table 1: everyone; Table 2: 10 of 100; 3: 7 of 30; 4: 10 of 20)."""
    participants = {"1": 10, "2": 10, "3": 7, "4": 10}[table]
    recipe = load_table_recipe(table)
    spec = recipe.datasets[0]
    s = recipe.cell_settings(spec.key, "promptfl", 1)
    for round_index in (0, s.rounds - 1):
        assert len(sample_clients(partition_clients(spec), s.frac, 1, round_index)) == participants
