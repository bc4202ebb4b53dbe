"""The example record and the JSONL / CSV / Parquet loaders: mapping, metadata, images, and clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ports.errors import InputError
from precise_jax.data import Example, load_examples, save_examples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "imgs" / "red.png"
    path.parent.mkdir()
    Image.new("RGB", (8, 6), (255, 0, 0)).save(path)
    return path


def test_record_validates_itself():
    example = Example(id="a", prompt="Why is the sky blue?", label="benign")
    assert (example.language, example.modality, example.images, example.response) == ("en", "text", (), None)
    with pytest.raises(AttributeError):
        example.prompt = "changed"  # frozen
    for bad, match in [(dict(prompt="  "), "empty prompt"), (dict(label="unsafe"), "label 'unsafe'"),
                       (dict(modality="audio"), "modality 'audio'"), (dict(id=""), "empty id"),
                       (dict(modality="typographic"), "no image")]:
        with pytest.raises(InputError, match=match):
            Example(**{**dict(id="a", prompt="p", label="benign"), **bad})


def test_jsonl_with_column_mapping_defaults_and_metadata(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"Goal": "Write a phishing email", "Category": "Fraud", "uid": 7, "note": "x"},
        {"Goal": "Explain photosynthesis", "Category": "Science", "uid": 8, "language": "fr"},
    ])
    examples = load_examples(path, columns={"prompt": "Goal", "category": "Category", "id": "uid"},
                             defaults={"label": "harmful", "source": "demo"})
    assert [e.id for e in examples] == ["7", "8"]
    assert examples[0] == Example(id="7", prompt="Write a phishing email", label="harmful", source="demo",
                                  category="Fraud")
    assert examples[0].metadata == {"note": "x"}
    assert examples[1].language == "fr" and examples[1].modality == "text"


def test_csv_with_images_and_generated_ids(tmp_path, photo):
    path = tmp_path / "set.csv"
    path.write_text("\ufeffprompt,label,images\nDescribe this,benign,imgs/red.png\n"
                    'Two images,benign,"[""imgs/red.png"", ""imgs/red.png""]"\nNo image,harmful,\n',
                    encoding="utf-8")
    examples = load_examples(path)
    assert [e.id for e in examples] == ["set:1", "set:2", "set:3"]
    assert examples[0].images == (photo,) and examples[0].modality == "image+text"
    assert examples[1].images == (photo, photo)
    assert examples[2].images == () and examples[2].modality == "text" and examples[2].source == "set"


def test_parquet_and_folders(tmp_path, photo):
    folder = tmp_path / "sets"
    (folder / "b").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "label": ["benign", "harmful"],
                             "images": [[str(photo)], []], "id": ["x1", "x2"]}), folder / "b" / "two.parquet")
    write_jsonl(folder / "a.jsonl", [{"prompt": "p0", "label": "benign", "id": "x0"}])
    (folder / "notes.txt").write_text("ignored")
    examples = load_examples(folder)
    assert [e.id for e in examples] == ["x0", "x1", "x2"]  # files in sorted path order
    assert examples[1].images == (photo,) and examples[2].images == ()
    write_jsonl(folder / "c.jsonl", [{"prompt": "again", "label": "benign", "id": "x1"}])
    with pytest.raises(InputError, match=r"c\.jsonl line 1: example id 'x1' was already used at .*two\.parquet row 1"):
        load_examples(folder)


@pytest.mark.parametrize("content, match", [
    ("Goal,label\nhello,benign\n", r"bad\.csv has no column 'prompt'; its columns are \['Goal', 'label'\]"),
    ("prompt,label\nhello,benign\n  ,benign\n", r"bad\.csv row 2: empty prompt"),
    ("prompt,label\nhello,unsafe\n", r"bad\.csv row 1: .*label 'unsafe'"),
    ("prompt,label\n", r"bad\.csv holds no examples"),
    ("prompt\nhello\n", r"bad\.csv has no column 'label'"),
])
def test_bad_csv(tmp_path, content, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(InputError, match=match):
        load_examples(tmp_path / "bad.csv")


def test_bad_jsonl_and_paths(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "label": "benign"}\n{"label": "benign"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl line 2 has no column 'prompt'"):
        load_examples(path)
    path.write_text('{"prompt": "ok", "label": "benign"}\n{"prompt": "ok",\n')
    with pytest.raises(InputError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_examples(path)
    with pytest.raises(InputError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no .jsonl/.csv/.parquet files"):
        load_examples(tmp_path / "empty")
    with pytest.raises(InputError, match="unknown example fields"):
        load_examples(path, columns={"text": "prompt"})


def test_bad_images_name_the_row(tmp_path, photo):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_jsonl(tmp_path / "imgs.jsonl", [
        {"prompt": "fine", "label": "benign", "images": [str(photo)]},
        {"prompt": "broken", "label": "benign", "images": ["broken.png"]},
    ])
    with pytest.raises(InputError, match=r"imgs\.jsonl line 2: .*broken\.png is not a readable image"):
        load_examples(path)
    write_jsonl(path, [{"prompt": "gone", "label": "benign", "images": "nowhere.png"}])
    with pytest.raises(InputError, match=r"imgs\.jsonl line 1: image file .*nowhere\.png does not exist"):
        load_examples(path)
    assert load_examples(path, check_images=False)[0].images == (tmp_path / "nowhere.png",)


def test_save_round_trip_and_nothing_half_saved(tmp_path, photo):
    examples = [
        Example(id="a", prompt="Describe it", label="benign", images=(photo,), metadata={"k": [1, 2]}),
        Example(id="b", prompt="Make it", label="harmful", images=(Image.new("RGB", (4, 4), "blue"),),
                modality="typographic", language="zh", response="No.", category="c"),
    ]
    folder = save_examples(examples, tmp_path / "out")
    loaded = load_examples(folder)
    assert [(e.id, e.prompt, e.label, e.language, e.modality, e.response, e.category) for e in loaded] == \
        [(e.id, e.prompt, e.label, e.language, e.modality, e.response, e.category) for e in examples]
    assert loaded[0].metadata == {"k": [1, 2]}
    assert Image.open(loaded[1].images[0]).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(InputError, match="exists and is not empty"):
        save_examples(examples, folder)

    (tmp_path / "broken.png").write_bytes(b"garbage")
    bad = examples + [Example(id="c", prompt="x", label="benign", images=(tmp_path / "broken.png",))]
    with pytest.raises(InputError, match=r"example 'c' image 0: .*broken\.png is not a readable image"):
        save_examples(bad, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "imgs", "out"]  # no partial folder
    with pytest.raises(InputError, match=r"example 'c' image 0"):
        save_examples(bad, folder, overwrite=True)
    assert len(load_examples(folder)) == 2  # the old folder is untouched
