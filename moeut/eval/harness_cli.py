"""`lm_eval` command line with the `moeut` model registered:

    python -m moeut.eval.harness_cli run --model moeut --model_args checkpoint=runs/x \\
        --tasks lambada_openai,piqa --batch_size 16

(lm-eval 0.4.13's CLI has sub-commands `run`, `ls`, `validate`; the arguments are lm_eval's own.)
Its CLI only knows models whose modules were imported; this wrapper imports the adapter first.
"""
from __future__ import annotations


def main() -> None:
    from . import harness  # noqa: F401  (registers "moeut")
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
