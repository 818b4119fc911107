"""The shape of a dataset recipe (``data_recipes/<dataset>.toml``) and its agreement with the code.

A recipe is read by people and by ``pfedmoap partition`` / ``train`` (its
``[partition]`` and ``[train]`` defaults). Its ``[dataset]`` table describes
the data::

    [dataset]
    name = "flowers102"          # the registry name (= file stem)
    paper = "Table 1"            # where the paper uses it
    classes = 102                # number of classes
    class_names = "..."          # a list, or where they come from
    domains = [...]              # multi-domain datasets only
    layout = '''...'''           # the folder tree under the data root
    splits = "..."               # what train and test are

    [[dataset.sources]]          # one per Resource of the source class, same order
    file = "oxford_flowers/102flowers.tgz"
    url = "https://..."
    checksum = "md5:..."         # omitted where no published value is known
    manual = true                # only for files fetched by hand

The source classes' :class:`Resource` constants are what ``pfedmoap download``
uses; :func:`check_sources` (run by the tests) keeps the recipe's copy equal.
"""

from __future__ import annotations

from typing import Any

from pfedmoap_cli.data.resources import Resource, split_checksum

DATASET_KEYS = {"name", "paper", "classes", "class_names", "domains", "layout", "splits", "sources", "notes"}
REQUIRED_DATASET_KEYS = {"name", "classes", "layout", "splits"}
SOURCE_KEYS = {"file", "url", "checksum", "manual", "note"}
PARTITION_KEYS = {"scheme", "clients", "shots", "alpha", "min_size", "clients_per_domain", "dataset_options", "base_to_novel"}
SCHEMES = {"iid", "dirichlet", "pathological"}


def check_recipe(name: str, recipe: dict[str, Any]) -> list[str]:
    """Problems with the structure of recipe ``name`` (empty when it is well-formed).

    ``[train]`` keys are checked against the training settings by the caller
    (that layer sits above this one).
    """
    problems: list[str] = []
    dataset = recipe.get("dataset")
    if not isinstance(dataset, dict):
        return [f"{name}: no [dataset] table"]
    for key in sorted(REQUIRED_DATASET_KEYS - set(dataset)):
        problems.append(f"{name}: [dataset] lacks {key!r}")
    for key in sorted(set(dataset) - DATASET_KEYS):
        problems.append(f"{name}: [dataset] has unknown key {key!r}")
    if dataset.get("name") != name:
        problems.append(f"{name}: [dataset] name is {dataset.get('name')!r}, not the file stem")
    if not isinstance(dataset.get("classes"), int):
        problems.append(f"{name}: [dataset] classes must be an integer")
    for position, source in enumerate(dataset.get("sources", [])):
        where = f"{name}: [[dataset.sources]] #{position}"
        if not isinstance(source, dict):
            problems.append(f"{where} is not a table")
            continue
        for key in sorted(set(source) - SOURCE_KEYS):
            problems.append(f"{where} has unknown key {key!r}")
        for key in ("file", "url"):
            if not isinstance(source.get(key), str) or not source.get(key):
                problems.append(f"{where} needs a string {key!r}")
        if "checksum" in source:
            try:
                split_checksum(str(source["checksum"]))
            except ValueError as error:
                problems.append(f"{where}: {error}")
    partition = recipe.get("partition", {})
    for key in sorted(set(partition) - PARTITION_KEYS):
        problems.append(f"{name}: [partition] has unknown key {key!r}")
    if "scheme" in partition and partition["scheme"] not in SCHEMES:
        problems.append(f"{name}: [partition] scheme {partition['scheme']!r} is not one of {sorted(SCHEMES)}")
    if "base_to_novel" in partition and not isinstance(partition["base_to_novel"], bool):
        # TOML has booleans; a string "true" or a 1 is a typo that would otherwise read as true.
        problems.append(f"{name}: [partition] base_to_novel must be true or false, got {partition['base_to_novel']!r}")
    return problems


def check_sources(name: str, recipe: dict[str, Any], resources: tuple[Resource, ...]) -> list[str]:
    """Differences between the recipe's ``[[dataset.sources]]`` and the source class's resources."""
    listed = recipe.get("dataset", {}).get("sources", [])
    problems = []
    if len(listed) != len(resources):
        problems.append(f"{name}: the recipe lists {len(listed)} sources, the code {len(resources)}")
    for position, (entry, resource) in enumerate(zip(listed, resources)):
        want = {"file": resource.file, "url": resource.url, "checksum": resource.checksum, "manual": resource.manual}
        have = {"file": entry.get("file"), "url": entry.get("url"), "checksum": entry.get("checksum"), "manual": bool(entry.get("manual", False))}
        for key in want:
            if want[key] != have[key]:
                problems.append(f"{name}: source #{position} {key} is {have[key]!r} in the recipe but {want[key]!r} in the code")
    return problems
