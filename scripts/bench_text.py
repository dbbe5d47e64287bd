"""Benchmark the text models on the real listings: TF-IDF + linear SVM (reference) vs word2vec + text CNN vs a
fine-tuned transformer.

Every row is trained on the same product split per seed and evaluated on that split's held-out test
products; the table gives mean ± standard deviation over the seeds of accuracy, macro-F1 and training
time (word2vec + CNN for the CNN rows, fine-tuning for the transformer), printed and written to
reports/bench_text.md. Each finished (seed, model) result is also appended to a journal beside the report
(bench_text.jsonl), so a long run that is stopped loses nothing: ``--resume`` reuses the journal's results and
trains only what is missing.

Examples:
    python scripts/bench_text.py                                  # ../shared/marketplace, seeds 0 1 2
    python scripts/bench_text.py --seeds 0 --rows tfidf-svm cnn-frozen
    python scripts/bench_text.py --db-url sqlite:///data/real.db --images ../shared/marketplace/images
    python scripts/bench_text.py --seeds 0 1 2 3 4 5 --resume        # adds seeds 3-5 to an earlier run

The text-transformer row loads its pretrained encoder by hub id (--encoder); offline, lay out the cache first:
    eval "$(bash ../shared/pretrained/setup_hf_cache.sh)"
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from marketplace_reco.data import DataError, Marketplace, TextPreprocessor
from marketplace_reco.models import TextCNN, TextTransformerClassifier, Word2VecEmbedding
from marketplace_reco.models.text_transformer import DEFAULT_ENCODER
from marketplace_reco.settings import reports_dir
from marketplace_reco.training import text_cnn, text_transformer, word2vec
from marketplace_reco.training.benchmarks import (
    BenchmarkReport,
    ResultJournal,
    add_export_arguments,
    load_export,
    markdown_table,
)
from marketplace_reco.training.distributed import init_distributed
from marketplace_reco.training.metrics import evaluate
from marketplace_reco.training.runs import default_arguments

#: TextTransformerClassifier's defaults.
_TRANSFORMER = default_arguments(TextTransformerClassifier.__init__)
ROWS = ("tfidf-svm", "tfidf-svm-plain", "cnn-fine-tuned", "cnn-frozen", "text-transformer")
TFIDF_ROWS = ("tfidf-svm", "tfidf-svm-plain")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train TF-IDF + LinearSVC, word2vec + text CNN (frozen and fine-tuned embedding) and a fine-tuned "
                    "transformer on the same product splits of the real listings, and report held-out accuracy, "
                    "macro-F1 and training time.",
    )
    add_export_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one product split (and training seed) per value (default: 0 1 2)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="held-out test share (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="models to run (default: all)")
    parser.add_argument("--label-interval", type=int,
                        default=word2vec.Word2VecTrainConfig.label_interval,
                        help="word2vec reads each training text's class as a pseudo-word every N tokens; 0: plain "
                             "word2vec (default: %(default)s, the library's)")
    parser.add_argument("--ensemble-sizes", type=int, nargs="+", default=[1, 3, 5],
                        help="CNN ensembles to score: the largest is trained, a smaller one is its first members "
                             "(exactly what --ensemble-size k trains), 1 is the mean of the members scored alone "
                             "(default: %(default)s)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="text-transformer row: pretrained encoder, Hugging Face hub id or folder (default: "
                             "%(default)s)")
    parser.add_argument("--lexical-features", type=int, default=_TRANSFORMER["lexical_features"],
                        help="text-transformer row: hashed n-gram features of its lexical head (0: none); with one, "
                             "the encoder alone is scored too, from the same run (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report file (default: <reports folder>/bench_text.md); its journal of results is "
                             "the same path with the suffix .jsonl")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the journal's results for the same data, fractions, seeds and models instead of "
                             "starting it afresh; only the missing ones are trained (results of the same code: after "
                             "changing a model, run without --resume)")
    return parser


def _tfidf_svm(splits: dict[str, Marketplace], seed: int, plain: bool) -> tuple[np.ndarray, float]:
    """The reference: word 1-2-gram TF-IDF (sublinear tf) over the same tokens as the CNN, then a linear SVM;
    ``plain``: scikit-learn's defaults instead (unigrams of the raw lower-cased text, no stop words, no stems)."""
    started = time.perf_counter()
    vectorizer = TfidfVectorizer() if plain else TfidfVectorizer(
        tokenizer=TextPreprocessor().tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2),
        sublinear_tf=True)
    features = vectorizer.fit_transform(splits["train"].products["text"])
    classifier = LinearSVC(C=1.0, random_state=seed).fit(features, splits["train"].label_indices)
    seconds = time.perf_counter() - started
    # Decision scores rank the classes like probabilities would; evaluate() only needs their argmax.
    return classifier.decision_function(vectorizer.transform(splits["test"].products["text"])), seconds


def _text_cnn(splits: dict[str, Marketplace], seed: int, embedding: Word2VecEmbedding, fine_tune: bool,
              ensemble_size: int) -> tuple[np.ndarray, float]:
    """The text CNN with the library's (and the training script's) defaults over ``embedding``, with
    ``ensemble_size`` members: each member's test probabilities [n, members, classes] and the training seconds."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = TextCNN.from_word2vec(embedding, splits["train"].classes, fine_tune_embedding=fine_tune,
                                  ensemble_size=ensemble_size)
    text_cnn.train(model, splits, text_cnn.TextCNNTrainConfig(seed=seed))
    seconds = time.perf_counter() - started
    return model.predict_member_proba(splits["test"].products["text"].tolist()), seconds


def _text_transformer(splits: dict[str, Marketplace], seed: int, encoder: str, lexical_features: int
                      ) -> tuple[dict[str, np.ndarray], float, dict]:
    """The text transformer fine-tuned with the library's (and the training script's) defaults but
    ``lexical_features``: its test logits by row (with a lexical head, also the encoder's alone: the same run without
    the head's scores), the training seconds and what validation chose (the kept epoch, its accuracy, every
    epoch's; the lexical head's weight)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = TextTransformerClassifier(splits["train"].classes, encoder=encoder, lexical_features=lexical_features)
    trained = text_transformer.train(model, splits, text_transformer.TextTransformerTrainConfig(seed=seed))
    seconds = time.perf_counter() - started
    validation = {"best_epoch": trained.metrics["best_epoch"],
                  "validation_accuracy": trained.metrics["validation_accuracy"],
                  "validation_accuracy_by_epoch": [row["val_accuracy"] for row in trained.history]}
    texts = splits["test"].products["text"].tolist()
    logits = {"text-transformer": model.logits(texts)}
    if model.lexical is not None:
        validation["lexical_weight"] = model.lexical_weight
        logits["text-transformer, encoder alone"] = (logits["text-transformer"]
                                                     - model.lexical_weight * model.lexical.scores(texts))
    return logits, seconds, validation


def _ensembles(labels: np.ndarray, member_scores: np.ndarray, sizes: list[int], classes: list[str],
               cnn_seconds: float, word2vec_s: float) -> dict[int, dict[str, float]]:
    """Scores of the ensembles of the first k members (k = 1: the members alone, averaged) and their cost."""
    trained = member_scores.shape[1]
    scored = {}
    for k in sizes:
        if k == 1:
            alone = [evaluate(labels, member_scores[:, m], classes) for m in range(trained)]
            metrics = {key: statistics.mean(a[key] for a in alone) for key in ("accuracy", "macro_f1")}
        else:
            metrics = evaluate(labels, member_scores[:, :k].mean(axis=1), classes)
        # Members train one after the other, so k of them cost k / trained of the CNN time.
        scored[k] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "seconds": word2vec_s + cnn_seconds * k / trained}
    return scored


def _mean_std(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _report_body(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, source: str,
                 sizes: dict[str, int], journal: Path, reused_runs: int) -> str:
    header = ["model", "accuracy", "macro-F1", "train s", "accuracy per seed"]
    rows = [[name, _mean_std([r["accuracy"] for r in runs], 4), _mean_std([r["macro_f1"] for r in runs], 4),
             _mean_std([r["seconds"] for r in runs], 1), " ".join(f"{r['accuracy']:.4f}" for r in runs)]
            for name, runs in results.items()]
    return "\n".join([
        f"Data: {source}; products per split {sizes}; split by product, stratified on the root category; "
        f"seeds {' '.join(map(str, args.seeds))} (one split and one training seed each). "
        "Accuracy and macro-F1 on each seed's held-out test products, mean ± standard deviation over seeds.",
        "",
        markdown_table(header, rows),
        "",
        "- `tfidf-svm`: word 1-2-gram TF-IDF with sublinear tf over the same tokens (TextPreprocessor defaults), "
        "LinearSVC C=1 (reference). `tfidf-svm-plain`: scikit-learn's defaults (unigram TF-IDF of the raw "
        "lower-cased text), LinearSVC C=1: an untuned baseline, for scale.",
        "- `cnn-*`: skip-gram word2vec trained on each split's training text only"
        + (f", with each text's class read as a pseudo-word every {args.label_interval} tokens (`--label-interval`)"
           if args.label_interval else ", plain (`--label-interval 0`: no class pseudo-words)")
        + ", then the text CNN with the "
        "library defaults (scripts/train_text_cnn.py's: adversarial training on the word vectors, epsilon 0.05) but "
        "`ensemble_size`: members trained one after the other (seeds seed, seed+1, ...), their probabilities "
        "averaged. `cnn-frozen` keeps the word2vec vectors fixed "
        "(the default), `cnn-fine-tuned` trains them too (`--fine-tune-embedding`).",
        f"- `k members`: the first k of the {max(args.ensemble_sizes)} trained members, exactly what "
        "`--ensemble-size k` trains; `1 member` is the mean of the members scored alone. `train s` is word2vec "
        "plus k members' share of the CNN time.",
        (f"- `text-transformer`: {args.encoder} fine-tuned with scripts/train_text_transformer.py's defaults (256 "
         "word pieces, head 192 + tail, batch 32, peak LR 1e-4 and 10x for the head, 10% warm-up then linear decay, "
         f"frozen word embeddings, label smoothing 0.1, bf16 autocast, at most "
         f"{text_transformer.TextTransformerTrainConfig.epochs} epochs, the best validation epoch kept)."
         + "".join(f" Seed {seed}: validation accuracy by epoch "
                   f"{' '.join(f'{a:.3f}' for a in run['validation_accuracy_by_epoch'])}, "
                   f"epoch {run['best_epoch']} kept."
                   + (f" Lexical head weight {run['lexical_weight']:g}." if "lexical_weight" in run else "")
                   for seed, run in zip(args.seeds, results.get("text-transformer", []))
                   if "validation_accuracy_by_epoch" in run)
         + (f" With `--lexical-features {args.lexical_features}`: a lexical head (hashed word 1-2-gram TF-IDF, "
            "a linear SVM fitted on the training texts after the encoder, its weight in the logits chosen on "
            "validation) joins the logits; `encoder alone` scores the same run without it."
            if args.lexical_features else "")),
        *([f"- {reused_runs} of the {len(args.seeds) * len(args.rows)} (seed, model) runs were taken from the "
           f"journal {journal.name} (`--resume`), their times from the run that made them."] if reused_runs else []),
    ])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    init_distributed()  # one process; sets torch's threads from the cores (or OMP_NUM_THREADS)
    fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    report = BenchmarkReport("Text models on the real listings", args.output or reports_dir() / "bench_text.md", argv)
    try:
        marketplace, source = load_export(args)
        journal = ResultJournal(report.path.with_suffix(".jsonl"),
                                {"data": source, "fractions": list(fractions),
                                 "ensemble_sizes": sorted(args.ensemble_sizes), "label_interval": args.label_interval,
                                 # Only another encoder than the default's changes the setup (earlier journals stay
                                 # valid).
                                 **({"encoder": args.encoder} if args.encoder != DEFAULT_ENCODER else {}),
                                 **({"lexical_features": args.lexical_features}
                                    if args.lexical_features != _TRANSFORMER["lexical_features"] else {})},
                                args.resume)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results: dict[str, list[dict[str, float]]] = {}
    sizes: dict[str, int] = {}
    reused_runs = 0
    for seed in args.seeds:
        splits = marketplace.split(fractions, seed=seed)
        sizes = {name: len(split.products) for name, split in splits.items()}
        embedding, word2vec_s = None, 0.0
        for name in args.rows:
            reused = journal.get(seed, name)
            if reused is not None:
                scored, reused_runs = reused, reused_runs + 1
            elif name in TFIDF_ROWS:
                scores, seconds = _tfidf_svm(splits, seed, plain=name == "tfidf-svm-plain")
                metrics = evaluate(splits["test"].label_indices, scores, marketplace.classes)
                scored = {name: {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "seconds": seconds}}
            elif name == "text-transformer":
                logits, seconds, validation = _text_transformer(splits, seed, args.encoder, args.lexical_features)
                scored = {}
                for row_name, row_logits in logits.items():
                    metrics = evaluate(splits["test"].label_indices, row_logits, marketplace.classes)
                    scored[row_name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                        "seconds": seconds, **validation}
            else:
                if embedding is None:  # one embedding per split, shared by the CNN rows
                    started = time.perf_counter()
                    embedding, _ = word2vec.train(splits, word2vec.Word2VecTrainConfig(
                        seed=seed, label_interval=args.label_interval))
                    word2vec_s = time.perf_counter() - started
                member_scores, seconds = _text_cnn(splits, seed, embedding, fine_tune=name == "cnn-fine-tuned",
                                                   ensemble_size=max(args.ensemble_sizes))
                by_size = _ensembles(splits["test"].label_indices, member_scores,
                                     sorted(args.ensemble_sizes, reverse=True), marketplace.classes, seconds,
                                     word2vec_s)
                scored = {f"{name}, {k} member{'s' if k > 1 else ''}": row for k, row in by_size.items()}
            if reused is None:
                journal.add(seed, name, scored)
            for row_name, row in scored.items():
                results.setdefault(row_name, []).append(row)
                print(f"seed {seed} {row_name}: accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}, "
                      f"{row['seconds']:.1f}s{' (from the journal)' if reused is not None else ''}", flush=True)
    body = _report_body(results, args, source, sizes, journal.path, reused_runs)
    print(body)
    report.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
