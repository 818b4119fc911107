"""Paper-table recipes: ``data_recipes/table<N>.toml`` (and ``demo.toml``), typed and validated.

A table recipe says which cells a paper table has -- datasets (columns) x
rows (methods with their options) x seeds -- with every setting that defines
them, and the paper's reported value of each cell where it is known. It is
self-contained: cells resolve as ``TrainSettings()`` defaults < the recipe's
``[train]`` < the dataset entry's ``train`` < the row's ``train`` < the seed.
Dataset recipes are not consulted, so editing one never changes which runs a
table expects.

Format (keys not listed here are errors)::

    [table]
    title = "Table 1: ..."
    seeds = [1, 2, 3]            # experiment seeds, one run per seed and cell
    partition_seed = "run"       # optional; "run" (the default when absent): one partition per
                                 # (dataset entry, seed), built with that seed; an integer N: one
                                 # partition per dataset entry, built with seed N, for every seed
    columns = "datasets"         # or "domains": one column per domain + "avg"; or "base-to-novel":
                                 # Local, Base, Novel, HM, HM3 per dataset (every partition base_to_novel)
    note = "..."                 # optional, printed under the table
    compare_paper = true         # paper/Δ columns (n/a where [paper] has no value); false for tables the paper lacks

    [train]                      # every cell; keys as in run.json's settings
    rounds = 10
    backbone = "RN50"

    [[datasets]]
    name = "flowers102"
    key = "flowers102"                        # optional, default name; the column's id. Distinct keys let
                                              # one dataset appear twice (e.g. two partition schemes)
    label = "Flowers102"                      # optional
    domains = ["clipart", "..."]              # required when columns = "domains"
    partition = { scheme = "pathological", clients = 10, shots = 16 }
    train = { batch_size = 16 }               # optional

    [[rows]]
    key = "pfedmoap-lam0"                     # unique; [a-z0-9_-]+; --only accepts it
    label = "pFedMoAP (λ=0)"
    method = "pfedmoap"
    train = { method_options = { lam = 0.0 } }   # optional

    [paper.pfedmoap-lam0]                     # row key -> dataset key -> value
    flowers102 = [97.61, 0.11]                # [mean, std] or a bare mean, in %
    # domain tables: [paper.<row>.<dataset>] with one value per domain and "avg";
    # base-to-novel tables: one value per column key (local, base, novel, hm, hm3)

``partition`` keys: ``scheme`` (iid, dirichlet, pathological), ``clients``,
``alpha``, ``shots``, ``min_size``, ``clients_per_domain``,
``dataset_options`` (passed to the dataset source, e.g. synthetic sizes),
``base_to_novel`` (true: clients train on the first ceil(C / 2) classes only,
PROTOCOL-MORE.md section 6; runs then also record base and novel accuracy).

Partitions follow the run seed by default, as the reference implementation
draws its few-shot samples and Dirichlet splits per seed: a cell's mean +- std
over seeds then includes the variance of the partition, not only that of
training. ``partition_seed = N`` fixes one partition for all seeds (the
synthetic recipes keep it, their published numbers were measured that way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pfedmoap_cli.data.build_partition import SCHEMES, PartitionSettings
from pfedmoap_cli.engine.settings import TrainSettings, merge_settings, validate_settings
from pfedmoap_cli.errors import ConfigError
from pfedmoap_cli.recipes import read_toml, recipes_dir

AVG = "avg"
#: ``[table] partition_seed`` value (and the default) for one partition per run seed.
PARTITION_SEED_RUN = "run"
_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
#: ``[table] columns`` value for the generalisation tables (PROTOCOL-MORE.md section 6).
BASE_TO_NOVEL = "base-to-novel"
_COLUMN_KINDS = ("datasets", "domains", BASE_TO_NOVEL)
#: The column keys of a base-to-novel table, per dataset entry, with their labels:
#: Local (own classes), Base, Novel, HM (two-way, base/novel) and HM3 (three-way, local/base/novel).
LOCAL, BASE, NOVEL, HM, HM3 = "local", "base", "novel", "hm", "hm3"
GENERALISATION_COLUMNS = ((LOCAL, "Local"), (BASE, "Base"), (NOVEL, "Novel"), (HM, "HM"), (HM3, "HM3"))


@dataclass(frozen=True)
class PaperValue:
    """A value the paper reports: accuracy in percent, with its std when given."""

    mean: float
    std: float | None = None


@dataclass(frozen=True)
class PartitionSpec:
    """How one dataset of the table is split (all schemes' parameters)."""

    scheme: str
    clients: int
    alpha: float | None = None
    shots: int | None = None
    min_size: int = 2
    clients_per_domain: int | None = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    base_to_novel: bool = False

    def settings(self, seed: int) -> PartitionSettings:
        """The :class:`PartitionSettings` of this spec, built with partition seed ``seed``."""
        return PartitionSettings(
            scheme=self.scheme,
            num_clients=self.clients,
            seed=seed,
            alpha=self.alpha,
            shots=self.shots,
            min_size=self.min_size,
            clients_per_domain=self.clients_per_domain,
            base_to_novel=self.base_to_novel,  # recorded in the partition file only when true
        )

    @property
    def scheme_name(self) -> str:
        """The scheme as a partition file records it (``domain-dirichlet`` for domain splits)."""
        return f"domain-{self.scheme}" if self.clients_per_domain is not None else self.scheme


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset entry of a table, with its partition and setting overrides.

    ``name`` is the registered dataset; ``key`` identifies the entry (its
    column(s), its cells, ``--only``, the paper values): it equals ``name``
    unless the recipe lists one dataset more than once, e.g. under two partitions.
    """

    name: str
    key: str
    label: str
    partition: PartitionSpec
    train: Mapping[str, Any] = field(default_factory=dict)
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    """One row of a table: a method with its options."""

    key: str
    label: str
    method: str
    train: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """One column of a table: a dataset entry (``key`` = the entry's key) or one of its domains / ``avg``."""

    dataset: str
    key: str
    label: str


@dataclass(frozen=True)
class TableRecipe:
    """A validated paper-table recipe (see the module docstring for the file format)."""

    name: str
    path: Path
    title: str
    seeds: tuple[int, ...]
    partition_seed: int | None  # None: one partition per run seed, built with it; N: one partition, seed N
    per_domain: bool
    note: str
    compare_paper: bool
    train: Mapping[str, Any]
    datasets: tuple[DatasetSpec, ...]
    rows: tuple[RowSpec, ...]
    paper: Mapping[tuple[str, str, str], PaperValue]
    generalisation: bool = False  # columns = "base-to-novel": Local, Base, Novel, HM, HM3 per dataset entry

    @property
    def stem(self) -> str:
        """Base name of the report files (``table1``, ``demo``)."""
        return self.path.stem

    @property
    def per_seed_partitions(self) -> bool:
        """Whether each run seed has its own partition (built with that seed)."""
        return self.partition_seed is None

    def partition_seed_for(self, seed: int) -> int:
        """The seed of the partition that the runs of experiment seed ``seed`` use."""
        return seed if self.partition_seed is None else self.partition_seed

    def partition_seeds(self) -> tuple[int, ...]:
        """The distinct partition seeds of the table, in seed order (one when fixed)."""
        return tuple(dict.fromkeys(self.partition_seed_for(seed) for seed in self.seeds))

    def partition_mode(self) -> str:
        """How the table's partitions are drawn, as its reports and ``sweep --dry-run`` state it."""
        if self.partition_seed is None:
            return "partitions: one per seed (partition seed = run seed)"
        return f"partitions: fixed, seed {self.partition_seed}"

    def dataset(self, key: str) -> DatasetSpec:
        """The dataset entry with this key."""
        return next(d for d in self.datasets if d.key == key)

    def row(self, key: str) -> RowSpec:
        return next(r for r in self.rows if r.key == key)

    def columns(self, dataset: str | None = None) -> list[Column]:
        """The table's columns in order (of one dataset when ``dataset`` is given)."""
        columns = []
        for spec in self.datasets:
            if dataset is not None and spec.key != dataset:
                continue
            if self.per_domain:
                columns += [Column(spec.key, d, d) for d in spec.domains] + [Column(spec.key, AVG, "Avg")]
            elif self.generalisation:
                columns += [Column(spec.key, key, label) for key, label in GENERALISATION_COLUMNS]
            else:
                columns.append(Column(spec.key, spec.key, spec.label))
        return columns

    def paper_value(self, row: str, column: Column) -> PaperValue | None:
        return self.paper.get((row, column.dataset, column.key))

    def cell_settings(self, dataset: str, row: str, seed: int) -> TrainSettings:
        """The resolved, validated settings of one cell and seed."""
        spec, row_spec = self.dataset(dataset), self.row(row)
        where = f"table recipe {self.path}"
        settings = merge_settings(TrainSettings(), self.train, f"{where} [train]")
        settings = merge_settings(settings, spec.train, f"{where} (dataset {dataset} train)")
        settings = merge_settings(settings, {**row_spec.train, "method": row_spec.method}, f"{where} (row {row} train)")
        settings = merge_settings(settings, {"seed": seed}, where)
        return validate_settings(settings)


# ---- loading -------------------------------------------------------------


def _fail(path: Path, what: str) -> ConfigError:
    return ConfigError(f"table recipe {path}: {what}; fix the file")


def _check_keys(path: Path, where: str, data: Mapping[str, Any], allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _fail(path, f"unknown key(s) {', '.join(unknown)} in {where} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(data))
    if missing:
        raise _fail(path, f"{where} lacks {', '.join(missing)}")


def _table(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"{where} must be a table")
    return value


def _str(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"{where} must be a non-empty string")
    return value


def _int(path: Path, where: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"{where} must be a number, got {value!r}")
    return float(value)


def _check_train(path: Path, where: str, overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """Refuse unknown or mistyped settings now rather than when a cell resolves."""
    _table(path, where, overrides)
    if "seed" in overrides:
        raise _fail(path, f"{where} sets seed; list experiment seeds in [table] seeds")
    merge_settings(TrainSettings(), overrides, f"table recipe {path} ({where})")
    return dict(overrides)


def _partition_seed(path: Path, value: Any) -> int | None:
    """``[table] partition_seed``: absent or ``"run"`` -> None (per seed), an integer >= 0 -> that fixed seed."""
    if value is None or value == PARTITION_SEED_RUN:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(
            path,
            f"[table] partition_seed must be \"{PARTITION_SEED_RUN}\" (one partition per seed, built with it; the default) "
            f"or an integer >= 0 (one fixed partition for every seed), got {value!r}",
        )
    return value


def _paper_value(path: Path, where: str, value: Any) -> PaperValue:
    if isinstance(value, list):
        if len(value) != 2:
            raise _fail(path, f"{where} must be [mean, std] or a bare mean, got {value!r}")
        return PaperValue(_number(path, where, value[0]), _number(path, where, value[1]))
    return PaperValue(_number(path, where, value))


def _partition(path: Path, where: str, raw: Any) -> PartitionSpec:
    raw = _table(path, where, raw)
    allowed = {"scheme", "clients", "alpha", "shots", "min_size", "clients_per_domain", "dataset_options", "base_to_novel"}
    _check_keys(path, where, raw, allowed, {"scheme", "clients"})
    scheme = _str(path, f"{where}.scheme", raw["scheme"])
    if scheme not in SCHEMES:
        raise _fail(path, f"{where}.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    alpha = raw.get("alpha")
    if scheme == "dirichlet":
        if alpha is None or _number(path, f"{where}.alpha", alpha) <= 0:
            raise _fail(path, f"{where}: the dirichlet scheme needs alpha > 0")
        alpha = float(alpha)
    elif alpha is not None:
        raise _fail(path, f"{where}.alpha is only for the dirichlet scheme")
    shots = raw.get("shots")
    if shots is not None:
        if scheme != "pathological":
            raise _fail(path, f"{where}.shots is only for the pathological scheme")
        shots = _int(path, f"{where}.shots", shots)
    per_domain = raw.get("clients_per_domain")
    if per_domain is not None:
        per_domain = _int(path, f"{where}.clients_per_domain", per_domain, 1)
    base_to_novel = raw.get("base_to_novel", False)
    if not isinstance(base_to_novel, bool):
        raise _fail(path, f"{where}.base_to_novel must be true or false, got {base_to_novel!r}")
    return PartitionSpec(
        scheme=scheme,
        clients=_int(path, f"{where}.clients", raw["clients"], 1),
        alpha=alpha,
        shots=shots,
        min_size=_int(path, f"{where}.min_size", raw.get("min_size", 2), 1),
        clients_per_domain=per_domain,
        dataset_options=dict(_table(path, f"{where}.dataset_options", raw.get("dataset_options", {}))),
        base_to_novel=base_to_novel,
    )


def parse_table_recipe(data: Mapping[str, Any], path: Path, name: str) -> TableRecipe:
    """Validate a decoded table recipe; every defect is a one-line :class:`ConfigError`."""
    path = Path(path)
    _check_keys(path, "the file", data, {"table", "train", "datasets", "rows", "paper"}, {"table", "datasets", "rows"})
    meta = _table(path, "[table]", data["table"])
    _check_keys(path, "[table]", meta, {"title", "seeds", "partition_seed", "columns", "note", "compare_paper"}, {"title", "seeds"})
    compare_paper = meta.get("compare_paper", True)
    if not isinstance(compare_paper, bool):
        raise _fail(path, "[table] compare_paper must be true or false")
    seeds = meta["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise _fail(path, "[table] seeds must be a non-empty list of integers")
    seeds = tuple(_int(path, "[table] seeds", s) for s in seeds)
    if len(set(seeds)) != len(seeds):
        raise _fail(path, "[table] seeds repeats a seed")
    columns = meta.get("columns", "datasets")
    if columns not in _COLUMN_KINDS:
        raise _fail(path, f"[table] columns must be one of {', '.join(_COLUMN_KINDS)}, got {columns!r}")
    per_domain = columns == "domains"
    generalisation = columns == BASE_TO_NOVEL
    train = _check_train(path, "[train]", data.get("train", {}))
    if "method" in train or "method_options" in train:
        raise _fail(path, "[train] sets method or method_options; they belong to [[rows]]")

    raw_datasets = data["datasets"]
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise _fail(path, "[[datasets]] must list at least one dataset")
    datasets: list[DatasetSpec] = []
    for i, raw in enumerate(raw_datasets):
        where = f"datasets[{i}]"
        raw = _table(path, where, raw)
        _check_keys(path, where, raw, {"name", "key", "label", "partition", "train", "domains"}, {"name", "partition"})
        ds_name = _str(path, f"{where}.name", raw["name"])
        ds_key = _str(path, f"{where}.key", raw.get("key", ds_name))
        if not _KEY.match(ds_key):
            raise _fail(path, f"{where}.key {ds_key!r} must match [a-z0-9][a-z0-9_.-]*")
        if any(d.key == ds_key for d in datasets):
            raise _fail(path, f"dataset key {ds_key} is used twice; give each entry of the same dataset its own key")
        part = _partition(path, f"{where}.partition", raw["partition"])
        domains = raw.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains) or len(set(domains)) != len(domains):
            raise _fail(path, f"{where}.domains must be a list of distinct names")
        if per_domain:
            if not domains:
                raise _fail(path, f"{where} needs domains (the table has a column per domain)")
            if part.clients_per_domain is None:
                raise _fail(path, f"{where}.partition needs clients_per_domain (the table has a column per domain)")
            if part.clients != len(domains) * part.clients_per_domain:
                raise _fail(
                    path,
                    f"{where}.partition.clients is {part.clients}, but {len(domains)} domains x {part.clients_per_domain} clients per domain "
                    f"= {len(domains) * part.clients_per_domain}",
                )
        if generalisation and not part.base_to_novel:
            raise _fail(path, f"{where}.partition needs base_to_novel = true (the table has base-to-novel columns)")
        train_ds = _check_train(path, f"{where}.train", raw.get("train", {}))
        if "method" in train_ds or "method_options" in train_ds:
            raise _fail(path, f"{where}.train sets method or method_options; they belong to [[rows]]")
        datasets.append(
            DatasetSpec(
                name=ds_name,
                key=ds_key,
                label=_str(path, f"{where}.label", raw.get("label", ds_key)),
                partition=part,
                train=train_ds,
                domains=tuple(domains),
            )
        )

    raw_rows = data["rows"]
    if not isinstance(raw_rows, list) or not raw_rows:
        raise _fail(path, "[[rows]] must list at least one row")
    rows: list[RowSpec] = []
    for i, raw in enumerate(raw_rows):
        where = f"rows[{i}]"
        raw = _table(path, where, raw)
        _check_keys(path, where, raw, {"key", "label", "method", "train"}, {"method"})
        method = _str(path, f"{where}.method", raw["method"])
        key = _str(path, f"{where}.key", raw.get("key", method))
        if not _KEY.match(key):
            raise _fail(path, f"{where}.key {key!r} must match [a-z0-9][a-z0-9_.-]*")
        if any(r.key == key for r in rows):
            raise _fail(path, f"row key {key} is used twice; give the rows distinct keys")
        train_row = _check_train(path, f"{where}.train", raw.get("train", {}))
        if "method" in train_row:
            raise _fail(path, f"{where}.train sets method; use {where}.method")
        rows.append(RowSpec(key=key, label=_str(path, f"{where}.label", raw.get("label", key)), method=method, train=train_row))

    paper: dict[tuple[str, str, str], PaperValue] = {}
    row_keys = [r.key for r in rows]
    raw_paper = _table(path, "[paper]", data.get("paper", {}))
    if raw_paper and not compare_paper:
        raise _fail(path, "[paper] values given but [table] compare_paper = false")
    for row_key, per_dataset in raw_paper.items():
        if row_key not in row_keys:
            raise _fail(path, f"[paper] names row {row_key!r}, which is not in [[rows]] ({', '.join(row_keys)})")
        for ds_name, value in _table(path, f"[paper.{row_key}]", per_dataset).items():
            spec = next((d for d in datasets if d.key == ds_name), None)
            if spec is None:
                raise _fail(path, f"[paper.{row_key}] names dataset {ds_name!r}, which is not a dataset key of [[datasets]]")
            where = f"[paper.{row_key}] {ds_name}"
            if per_domain or generalisation:
                known = [*spec.domains, AVG] if per_domain else [key for key, _ in GENERALISATION_COLUMNS]
                what = "one value per domain and avg" if per_domain else f"one value per column: {', '.join(known)}"
                for column, cell in _table(path, f"{where} ({what})", value).items():
                    if column not in known:
                        raise _fail(path, f"{where} names column {column!r}; known: {', '.join(known)}")
                    paper[(row_key, ds_name, column)] = _paper_value(path, f"{where}.{column}", cell)
            else:
                paper[(row_key, ds_name, ds_name)] = _paper_value(path, where, value)

    recipe = TableRecipe(
        name=name,
        path=path,
        title=_str(path, "[table] title", meta["title"]),
        seeds=seeds,
        partition_seed=_partition_seed(path, meta.get("partition_seed")),
        per_domain=per_domain,
        note=str(meta.get("note", "")).strip(),
        compare_paper=compare_paper,
        train=train,
        datasets=tuple(datasets),
        rows=tuple(rows),
        paper=paper,
        generalisation=generalisation,
    )
    # Resolve every cell once so a bad combination fails here, not mid-sweep.
    for spec in recipe.datasets:
        for row in recipe.rows:
            recipe.cell_settings(spec.key, row.key, seeds[0])
    return recipe


# ---- finding tables --------------------------------------------------------


def _table_name(path: Path) -> str:
    match = re.fullmatch(r"table(\w+)", path.stem)
    return match.group(1) if match else path.stem


def available_tables(directory: Path | None = None) -> dict[str, Path]:
    """Table name -> recipe file, for every recipe in the folder with a ``[table]`` section."""
    directory = Path(directory) if directory is not None else recipes_dir()
    found: dict[str, Path] = {}
    for path in sorted(directory.glob("*.toml")):
        try:
            data = read_toml(path, "recipe")
        except ConfigError:
            continue
        if isinstance(data.get("table"), dict):
            found[_table_name(path)] = path
    return dict(sorted(found.items(), key=lambda item: (not item[0].isdigit(), item[0].zfill(8))))


def load_table_recipe(table: str) -> TableRecipe:
    """Load a table by name (``1``, ``table1``, ``demo``) or by the path of a ``.toml`` recipe."""
    candidate = Path(table).expanduser()
    if table.endswith(".toml") and candidate.is_file():
        path, name = candidate, _table_name(candidate)
    else:
        tables = available_tables()
        key = table[len("table"):] if re.fullmatch(r"table\w+", table) and table[len("table"):] in tables else table
        if key not in tables:
            listed = ", ".join(tables) or "none found in " + str(recipes_dir())
            raise ConfigError(f"unknown table '{table}'; choose one of: {listed} (or the path of a table recipe .toml)")
        path, name = tables[key], key
    return parse_table_recipe(read_toml(path, "table recipe"), path, name)
