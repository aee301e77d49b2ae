"""`parityrl doctor`: the layered diagnosis of an engine/trainer logprob mismatch.

    from parityrl.doctor import DoctorConfig, run

    report = run(DoctorConfig(model="builtin:tiny", quick=True))
    report.passed, report.exit_code, report.to_json()

config.py holds the options and refuses what cannot run; runner.py runs them. rungs.py is what the
ladder is made of, ladder.py climbs it (session.py: the model and engine it carries from rung to
rung), verdict.py judges, report.py prints and writes, outcome.py is what a run returns; the checks
beside the ladder: multiturn.py, sampler.py, dtypes.py (--compare-dtypes).
"""

from parityrl.doctor.config import DoctorConfig

__all__ = ["DoctorConfig", "DoctorReport", "Progress", "run"]


def __getattr__(name: str):
    # run() brings torch and vLLM in; imported when first asked for, so that the command line,
    # which reads DoctorConfig's field descriptions for its --help, starts instantly.
    if name in ("DoctorReport", "Progress", "run"):
        from parityrl.doctor import runner  # torch and vLLM: not for --help

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
