"""BLiMP (alexwarstadt/blimp, 67 paradigm jsonl files), SPEC 6.2.

Each minimal pair is scored without context: the unnormalised log-probability of each whole
sentence from its 2nd token (no BOS, so the first token is never scored). Correct iff the good
sentence scores strictly higher (7 pairs in the real data have identical good and bad strings and
therefore always count as wrong). Table metric: the average over the 67 paradigm accuracies.
`limit` applies per paradigm.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List

from ..scoring import MCItem, evaluate_multiple_choice
from .base import EvalOptions, Task, TaskDataMissing, check_limit, expect_str, read_jsonl
from .hub import blimp_items, load_records

PARADIGMS = (
    'adjunct_island', 'anaphor_gender_agreement', 'anaphor_number_agreement', 'animate_subject_passive',
    'animate_subject_trans', 'causative', 'complex_NP_island',
    'coordinate_structure_constraint_complex_left_branch', 'coordinate_structure_constraint_object_extraction',
    'determiner_noun_agreement_1', 'determiner_noun_agreement_2', 'determiner_noun_agreement_irregular_1',
    'determiner_noun_agreement_irregular_2', 'determiner_noun_agreement_with_adj_2',
    'determiner_noun_agreement_with_adj_irregular_1', 'determiner_noun_agreement_with_adj_irregular_2',
    'determiner_noun_agreement_with_adjective_1', 'distractor_agreement_relational_noun',
    'distractor_agreement_relative_clause', 'drop_argument', 'ellipsis_n_bar_1', 'ellipsis_n_bar_2',
    'existential_there_object_raising', 'existential_there_quantifiers_1', 'existential_there_quantifiers_2',
    'existential_there_subject_raising', 'expletive_it_object_raising', 'inchoative', 'intransitive',
    'irregular_past_participle_adjectives', 'irregular_past_participle_verbs',
    'irregular_plural_subject_verb_agreement_1', 'irregular_plural_subject_verb_agreement_2',
    'left_branch_island_echo_question', 'left_branch_island_simple_question',
    'matrix_question_npi_licensor_present', 'npi_present_1', 'npi_present_2', 'only_npi_licensor_present',
    'only_npi_scope', 'passive_1', 'passive_2', 'principle_A_c_command', 'principle_A_case_1',
    'principle_A_case_2', 'principle_A_domain_1', 'principle_A_domain_2', 'principle_A_domain_3',
    'principle_A_reconstruction', 'regular_plural_subject_verb_agreement_1',
    'regular_plural_subject_verb_agreement_2', 'sentential_negation_npi_licensor_present',
    'sentential_negation_npi_scope', 'sentential_subject_island', 'superlative_quantifiers_1',
    'superlative_quantifiers_2', 'tough_vs_raising_1', 'tough_vs_raising_2', 'transitive', 'wh_island',
    'wh_questions_object_gap', 'wh_questions_subject_gap', 'wh_questions_subject_gap_long_distance',
    'wh_vs_that_no_gap', 'wh_vs_that_no_gap_long_distance', 'wh_vs_that_with_gap',
    'wh_vs_that_with_gap_long_distance',
)
assert len(PARADIGMS) == 67


class Blimp(Task):
    """BLiMP: 67 paradigms of minimal pairs, whole-sentence unnormalised scores, no context
    (SPEC 6.2); table metric = mean of the paradigm accuracies."""

    name = "blimp"
    column = "BLiMP"
    normalize_default = False

    def load_local(self, opts: EvalOptions) -> List[MCItem]:
        """2-way items (good, bad; gold 0) from `<paradigm>.jsonl` files, `limit` per paradigm;
        TaskDataMissing if none is present, a warning naming missing paradigms."""
        root = opts.path_for(self.name, opts.root / "blimp")
        if not root.is_dir():
            raise TaskDataMissing(f"BLiMP directory not found: {root} (expects the 67 <paradigm>.jsonl files)")
        present = [p for p in PARADIGMS if (root / f"{p}.jsonl").is_file()]
        if not present:
            raise TaskDataMissing(f"no BLiMP paradigm files (<paradigm>.jsonl) in {root}")
        missing = [p for p in PARADIGMS if p not in present]
        if missing:
            warnings.warn(f"BLiMP: {len(missing)} of 67 paradigm files missing in {root}: {missing}; "
                          "the group average covers the others only")
        limit = check_limit(opts.limit)
        items = []
        for p in present:
            path = root / f"{p}.jsonl"
            for lineno, rec in read_jsonl(path, ["sentence_good", "sentence_bad"], limit):
                good = expect_str(rec, "sentence_good", path, lineno)
                bad = expect_str(rec, "sentence_bad", path, lineno)
                items.append(MCItem(context="", options=[good, bad], gold=0, group=p, id=f"{p}:{lineno}"))
        return items

    def load_hub(self, opts: EvalOptions) -> List[MCItem]:
        """Items of all 67 paradigms from the hub copy (one configuration each), `limit` per paradigm."""
        limit = check_limit(opts.limit)
        return [it for p in PARADIGMS for it in blimp_items(load_records(self.name, p, limit), p)]

    def evaluate(self, items, scorer, tokenizer, opts: EvalOptions) -> Dict[str, Any]:
        """Multiple-choice metrics (SPEC 6.1); `accuracy` = mean over paradigms, plus `n_groups`."""
        m = evaluate_multiple_choice(items, scorer, tokenizer, normalize=opts.normalize(self.name, self.normalize_default),
                                     desc="blimp", keep_items=opts.keep_items)
        m["accuracy"] = m["group_average"]
        m["n_groups"] = len(m["groups"])
        return m
