// The release upload form, progressively enhanced: a drop zone for the files, a folder picker
// for a bundle whose files go to several board folders, and a progress bar while the form is
// sent. Without this script the form is a plain multipart form and works the same (one board
// folder); with it the same form goes to the same address, by XMLHttpRequest, because fetch()
// reports no upload progress.
"use strict";

// A chosen folder stands for the board's root: its files go to their paths inside it. Both a
// picked file's webkitRelativePath ("app/lib/x.py") and a dropped entry's fullPath
// ("/app/lib/x.py") start with the folder's own name, which is no folder on the board.
function insideFolder(path) {
  return path.replace(/^\/?[^/]*\//, "");
}

// Left out of a folder as the CLI leaves them out of one (kinhbac/admin/cli.py, _bundle_files):
// hidden files and folders (.git, .DS_Store), which no board path may name, and Python's caches.
function leftOut(path) {
  return path.split("/").some((part) => part.startsWith(".") || part === "__pycache__");
}

// A dropped folder's files, each with its entry's fullPath. A directory reader gives its
// entries a batch at a time, until an empty batch.
async function droppedFiles(folder) {
  const found = [];
  const walk = async (directory) => {
    const reader = directory.createReader();
    for (;;) {
      const batch = await new Promise((done, fail) => reader.readEntries(done, fail));
      if (!batch.length) return;
      for (const entry of batch) {
        if (entry.isDirectory) {
          await walk(entry);
        } else {
          const file = await new Promise((done, fail) => entry.file(done, fail));
          found.push({ file, path: entry.fullPath });
        }
      }
    }
  };
  await walk(folder);
  return found;
}

function enhance() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const progress = document.getElementById("progress");
  const bar = document.getElementById("progress-bar");
  const percent = document.getElementById("progress-percent");
  const picker = document.getElementById("tree");
  const chosen = document.getElementById("tree-chosen");
  const listed = document.getElementById("tree-paths");
  const skipped = document.getElementById("tree-left-out");
  const refused = document.getElementById("drop-refused");
  let tree = [];  // the chosen folder's files: {file, path inside the folder}

  // Files with their paths (the folder's name first), or none: what the form then sends.
  const choose = (files) => {
    const all = files.map(({ file, path }) => ({ file, path: insideFolder(path) }))
      .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
    tree = all.filter(({ path }) => !leftOut(path));
    listed.replaceChildren(...tree.map(({ path }) => {
      const item = document.createElement("li");
      item.textContent = "/" + path;
      return item;
    }));
    const left = all.filter(({ path }) => leftOut(path)).map(({ path }) => "/" + path);
    skipped.querySelector("span").textContent = left.join(", ");
    skipped.hidden = !left.length;
    chosen.hidden = !all.length;
    input.required = !tree.length;  // the folder's files stand in for the chosen ones
    if (tree.length) input.value = "";
  };

  zone.hidden = false;  // only useful with this script
  picker.parentElement.hidden = false;
  picker.addEventListener("change", () => {
    refused.hidden = true;
    choose(Array.from(picker.files, (file) => ({ file, path: file.webkitRelativePath })));
  });
  input.addEventListener("change", () => {
    picker.value = "";
    choose([]);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();  // without it the browser opens the dropped file instead
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    refused.hidden = true;
    // The entries now: the drop's items are gone once this handler returns.
    const entries = Array.from(event.dataTransfer.items,
                               (item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
    if (!entries.some((entry) => entry && entry.isDirectory)) {
      picker.value = "";
      choose([]);
      input.files = event.dataTransfer.files;  // the form then sends them as if chosen
      return;
    }
    if (entries.length !== 1) {  // which one would be the board's root?
      refused.hidden = false;
      return;
    }
    picker.value = "";
    droppedFiles(entries[0]).then(choose);
  });

  // The form's fields; with a chosen folder, its files by their paths inside it, said so.
  const body = () => {
    const data = new FormData(form);  // the token first, as in the form
    if (!tree.length) return data;
    data.delete("file");  // the file input: left empty
    data.append("paths", "relative");
    for (const { file, path } of tree) data.append("file", file, path);
    return data;
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.upload.addEventListener("progress", (step) => {
      if (!step.lengthComputable) return;
      const done = Math.floor((step.loaded / step.total) * 100);
      bar.value = done;
      percent.textContent = done + " %";
    });
    request.addEventListener("load", () => {
      if (request.status < 300) {
        // The fleet answered with a redirect to the new release, which the request followed.
        window.location.assign(request.responseURL);
        return;
      }
      // A refusal is the form page again with the reason: put its content in place of ours.
      const page = new DOMParser().parseFromString(request.responseText, "text/html");
      const answer = page.querySelector("main");
      if (!answer) {  // not a console page (a proxy's error): show what it said
        percent.textContent = request.status + " " + request.statusText;
        return;
      }
      document.querySelector("main").replaceWith(answer);
      enhance();
    });
    request.addEventListener("error", () => form.submit());  // let the browser try and say
    progress.hidden = false;
    request.send(body());
  });
}

enhance();
