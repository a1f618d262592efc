"""The composition in xax/task/task.py is the whole composition: no mixin brings in another."""

import ast
import typing
from pathlib import Path

import pytest

import xax.task.task as task_module
from xax.task.base import BaseConfig, BaseTask
from xax.task.task import Config, SupervisedConfig, SupervisedTask, Task


def listed_bases(class_name: str) -> list[str]:
    """The names of the bases ``class_name`` lists in xax/task/task.py (type arguments dropped)."""
    tree = ast.parse(Path(task_module.__file__).read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    names = []
    for base in node.bases:
        target = base.value if isinstance(base, ast.Subscript) else base
        assert isinstance(target, ast.Name)
        names.append(target.id)
    return [name for name in names if name != "Generic"]


def resolved(names: list[str]) -> list[type]:
    return [getattr(task_module, name) for name in names]


def test_task_mro_is_the_list_in_task_py() -> None:
    mixins = resolved(listed_bases("Task"))
    assert list(Task.__mro__) == [Task, *mixins, BaseTask, typing.Generic, object]


def test_supervised_task_mro_puts_its_mixin_before_the_task() -> None:
    (mixin, task) = resolved(listed_bases("SupervisedTask"))
    assert task is Task
    assert list(SupervisedTask.__mro__) == [SupervisedTask, mixin, *Task.__mro__]


def test_config_mro_is_the_list_in_task_py() -> None:
    groups = resolved(listed_bases("Config"))
    assert list(Config.__mro__) == [Config, *groups, BaseConfig, object]
    (group, config) = resolved(listed_bases("SupervisedConfig"))
    assert config is Config
    assert list(SupervisedConfig.__mro__) == [SupervisedConfig, group, *Config.__mro__]


@pytest.mark.parametrize("mixin", resolved(listed_bases("Task") + listed_bases("SupervisedTask")[:1]))
def test_no_mixin_inherits_another(mixin: type) -> None:
    bases = [typing.get_origin(base) or base for base in getattr(mixin, "__orig_bases__", ())]
    assert [base for base in bases if base is not typing.Generic] == [BaseTask], mixin.__name__


@pytest.mark.parametrize("group", resolved(listed_bases("Config") + listed_bases("SupervisedConfig")[:1]))
def test_no_config_group_inherits_another(group: type) -> None:
    assert group.__bases__ == (BaseConfig,), group.__name__
