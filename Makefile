# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv and install the project into it first (torch comes from pip as pinned).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= runs/demo

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/engine synthesize --source demo --out $(DEMO_OUT) --unit-size 6
	$(BIN)/engine query $(DEMO_OUT) "SELECT split_part(i.file_path, '/', 1) AS subset, o.category, \
	  count(*) AS objects, count(*) FILTER (WHERE o.keep) AS kept, \
	  round(avg(o.box_iou), 3) AS mean_box_iou, \
	  min(coalesce(o.captions[2].text, o.captions[1].text)) AS example_caption \
	  FROM objects o JOIN images i USING (image_id) GROUP BY ALL ORDER BY subset, objects DESC LIMIT 24"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check engine pipelines model schemas tests bench

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf runs .pytest_cache
