// CSV in and out: RFC 4180 quoting (commas, quotes and newlines inside quoted fields), no library.

/** Rows of cells (strings) of a CSV text; blank lines are skipped. */
export function parseCSV(text) {
  const rows = [];
  let row = [];
  let cell = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        cell += '"';
        i++;
      } else if (ch === '"') quoted = false;
      else cell += ch;
    } else if (ch === '"' && cell === "") quoted = true;
    else if (ch === ",") {
      row.push(cell);
      cell = "";
    } else if (ch === "\n" || ch === "\r") {
      if (ch === "\r" && text[i + 1] === "\n") i++;
      row.push(cell);
      if (row.some((c) => c.trim() !== "")) rows.push(row);
      row = [];
      cell = "";
    } else cell += ch;
  }
  row.push(cell);
  if (row.some((c) => c.trim() !== "")) rows.push(row);
  return rows;
}

function isNumber(cell) {
  return cell.trim() !== "" && Number.isFinite(Number(cell));
}

/** Records for a model of `nFeatures` features from CSV rows: a header row (any non-numeric cell) is
 * skipped; a row of nFeatures + 1 cells keeps its first cell as the record's id. Returns
 * {records, ids, header} or throws an Error naming the first bad row. */
export function recordsFromCSV(text, nFeatures) {
  const rows = parseCSV(text);
  if (!rows.length) throw new Error("no records: paste CSV rows or choose a CSV file");
  let header = null;
  if (rows[0].some((c) => !isNumber(c))) header = rows.shift();
  const records = [];
  const ids = [];
  rows.forEach((row, i) => {
    const line = i + 1 + (header ? 1 : 0);
    let cells = row;
    let id = String(records.length);
    if (cells.length === nFeatures + 1) {
      id = cells[0];
      cells = cells.slice(1);
    }
    if (cells.length !== nFeatures) {
      throw new Error(`CSV line ${line} has ${row.length} values; the model takes ${nFeatures} features ` +
        `(optionally after an id column)`);
    }
    const bad = cells.findIndex((c) => !isNumber(c));
    if (bad >= 0) throw new Error(`CSV line ${line}, column ${bad + 1}: ${JSON.stringify(cells[bad])} is not a number`);
    records.push(cells.map(Number));
    ids.push(id);
  });
  return { records, ids, header };
}

function quote(value) {
  let s = value === null || value === undefined ? "" : String(value);
  // A text cell that a spreadsheet would run as a formula is kept as text.
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(s) && !isNumber(s)) s = `'${s}`;
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function toCSV(header, rows) {
  return [header, ...rows].map((r) => r.map(quote).join(",")).join("\n") + "\n";
}
