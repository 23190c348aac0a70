"""The test session's isolation (``tests/conftest.py::user_dirs``): every cache and data folder
the code and its libraries write resolves inside the session's temporary folder, never the
user's home or ``/tmp/<tool>_<user>``."""

from __future__ import annotations

from pathlib import Path


def _inside(path: str | Path, root: Path) -> bool:
    return root in Path(path).resolve().parents


def test_persona_gym_cache_and_data_dir_are_the_sessions(user_dirs: Path) -> None:
    from persona_gym.assets import cache_dir
    from persona_gym.data.download import default_data_dir
    from persona_gym.embeddings import default_cache_dir

    assert _inside(cache_dir(), user_dirs) and _inside(default_cache_dir(), user_dirs)
    assert _inside(default_data_dir(), user_dirs)


def test_library_caches_are_the_sessions(user_dirs: Path) -> None:
    import huggingface_hub.constants
    import matplotlib
    import platformdirs
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    for path in (
        platformdirs.user_cache_dir("x"),
        platformdirs.user_data_dir("x"),
        platformdirs.user_config_dir("x"),
        huggingface_hub.constants.HF_HUB_CACHE,
        inductor_cache_dir(),
        matplotlib.get_cachedir(),
        matplotlib.get_configdir(),
    ):
        assert _inside(path, user_dirs), path


def test_sb3_logger_without_tensorboard_writes_in_the_session(user_dirs: Path) -> None:
    from stable_baselines3.common.logger import configure

    logger = configure(None, [""])
    assert _inside(logger.get_dir() or "", user_dirs)


def test_the_session_converted_the_default_slm_into_its_cache(
    smollm2_path: str, user_dirs: Path
) -> None:
    assert _inside(smollm2_path, user_dirs)
