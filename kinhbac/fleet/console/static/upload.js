// The release upload form, progressively enhanced: a drop zone for the files, and a progress
// bar while the form is sent. Without this script the form is a plain multipart form and
// works the same; with it the same form goes to the same address, by XMLHttpRequest, because
// fetch() reports no upload progress.
"use strict";

function enhance() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const progress = document.getElementById("progress");
  const bar = document.getElementById("progress-bar");
  const percent = document.getElementById("progress-percent");

  zone.hidden = false;  // only useful with this script
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();  // without it the browser opens the dropped file instead
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    input.files = event.dataTransfer.files;  // the form then sends them as if chosen
  });

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
    request.send(new FormData(form));  // the token first, as in the form
  });
}

enhance();
