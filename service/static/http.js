// HTTP with the key: every read of the server's guarded endpoints goes through request().

const KEY_STORE = "foldserve.apiKey"; // sessionStorage: this tab only, gone when it closes

export const storedKey = () => sessionStorage.getItem(KEY_STORE);
export const storeKey = (key) => sessionStorage.setItem(KEY_STORE, key);
export const forgetKey = () => sessionStorage.removeItem(KEY_STORE);

export class Unauthorized extends Error {}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra) {
  const key = storedKey();
  const all = { ...extra };
  if (key) all.Authorization = `Bearer ${key}`; // or X-API-Key: the server takes either
  return all;
}

export async function request(path, options = {}) {
  const answer = await fetch(path, {
    cache: "no-store",
    ...options,
    headers: headers(options.headers),
  });
  if (answer.status === 401) throw new Unauthorized(path);
  if (!answer.ok) {
    let why = answer.statusText;
    try {
      why = (await answer.json()).error || why;
    } catch (_) {
      // not a JSON error body: the status text says enough
    }
    throw new HttpError(answer.status, `${path}: ${answer.status} ${why}`);
  }
  return answer;
}

export const getJson = async (path) => (await request(path)).json();
