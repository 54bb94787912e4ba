"""Cell labels (vlm/models/cell_labels.py): each grid cell's place in words before that cell's visual tokens."""

from pathlib import Path

import torch
from tiny_models import TINY_VLM_QUERIES, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.data.synthetic import SceneObject, canvas_position
from vlm.models.cell_labels import cell_names, labelled_slots

SPARE = "count"
from vlm.models.visual_block import VisualBlock
from vlm.models.vlm import VisionLanguageModel


def test_cell_names_are_the_captions_words_for_where_an_object_lies() -> None:
    for cell, name in enumerate(cell_names(3)):
        row, column = divmod(cell, 3)
        centre = SceneObject("red", "circle", "small", x=(column + 0.5) / 3, y=(row + 0.5) / 3)
        assert f" {name} " in f" {canvas_position(centre)} ", (cell, name, canvas_position(centre))
    assert cell_names(2) == ["top left", "top right", "bottom left", "bottom right"]
    assert cell_names(1) == ["center"]
    assert len(set(cell_names(4))) == 16


class WordIds:
    """A stand-in tokenizer: one id per whitespace-separated word."""

    def __init__(self) -> None:
        self.words: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return {"input_ids": [self.words.index(word) for word in text.split()]}


def test_each_cells_name_comes_right_before_its_queries() -> None:
    tokenizer = WordIds()
    layout = labelled_slots(tokenizer, num_queries=32, grid=3, spare_label=SPARE)
    spelt = " ".join("q" if token is None else tokenizer.words[token] for token in layout)
    assert spelt == ("top left q q q top q q q top right q q q left q q q center q q q right q q q "
                     f"bottom left q q q bottom q q q bottom right q q q {SPARE} q q q q q")


def test_the_visual_block_interleaves_label_words_and_queries_and_is_saved(tmp_path: Path) -> None:
    model = tiny_vlm(tiny_vlm_folders(tmp_path), perturb_seed=1)
    images, rows = image_embeds(2), [[model.prompt.example("Describe the image.", "a red circle")]] * 2
    with torch.no_grad():
        plain_loss = model(images, rows)
    model.set_visual_block(VisualBlock(grid=2, cell_labels=True, spare_label=SPARE))  # 4 queries, one per cell
    layout = labelled_slots(model.tokenizer, TINY_VLM_QUERIES, 2, SPARE)
    assert model.num_visual_tokens == len(layout) > TINY_VLM_QUERIES
    with torch.no_grad():
        embeds, packed = model.build_inputs(images, rows, left_pad=False)
        queries = model.query_tokens(images)
        labelled_loss = model(images, rows)
    start = len(model.prompt.prefix_ids)
    block = embeds[:, start:start + len(layout)]
    assert packed.is_visual[:, start:start + len(layout)].all()
    words = model.llm.get_input_embeddings().weight
    query = 0
    for position, token in enumerate(layout):
        if token is None:
            assert torch.equal(block[:, position], queries[:, query])
            query += 1
        else:
            assert torch.equal(block[:, position], words[token].expand(2, -1))
    assert query == TINY_VLM_QUERIES
    assert not torch.isclose(labelled_loss, plain_loss)

    model.save(tmp_path / "vlm")
    loaded = VisionLanguageModel.load(tmp_path / "vlm")
    assert loaded.cell_labels and loaded.num_visual_tokens == len(layout)
    with torch.no_grad():
        assert torch.equal(loaded(images, rows), labelled_loss)
