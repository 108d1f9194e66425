// A real OpenID Connect provider for the portal's sign-in tests (npm oidc-provider v9, installed by the
// test fixture next to a copy of this file). It listens on a free port of 127.0.0.1 and prints
// "listening on PORT". Its development login page takes any login name and password: the login name is the
// account's subject and its email ("unverified..." names get email_verified false).
import http from "node:http";
import Provider from "oidc-provider";

const { CLIENT_ID, CLIENT_SECRET, REDIRECT_URI } = process.env;
const server = http.createServer();
server.listen(0, "127.0.0.1", () => {
  const port = server.address().port;
  const provider = new Provider(`http://127.0.0.1:${port}`, {
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        redirect_uris: [REDIRECT_URI],
        grant_types: ["authorization_code"],
        response_types: ["code"],
      },
    ],
    claims: { openid: ["sub"], email: ["email", "email_verified"] },
    features: { devInteractions: { enabled: true } },
    pkce: { required: () => true },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: id, email_verified: !id.startsWith("unverified") };
        },
      };
    },
  });
  server.on("request", provider.callback());
  console.log(`listening on ${port}`);
});
